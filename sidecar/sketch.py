"""A log-bucketed latency histogram with 1% relative accuracy (DDSketch's mapping).

Bucket ``i`` holds values in ``(gamma**(i-1), gamma**i]`` with
``gamma = (1 + a) / (1 - a)``, ``a = 0.01``; its representative value
``2 * gamma**i / (gamma + 1)`` is within ``a`` of anything in it. Values are clamped
into ``[MIN_VALUE, MAX_VALUE]`` seconds, so the layout is fixed (``NBUCKETS`` dense
counters) and two histograms merge by adding counts.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
INV_LOG_GAMMA = _INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
MIN_VALUE = 1e-5  # 10 µs
MAX_VALUE = 3600.0  # 1 h
OFFSET = _OFFSET = math.ceil(math.log(MIN_VALUE) * _INV_LOG_GAMMA)
NBUCKETS = math.ceil(math.log(MAX_VALUE) * _INV_LOG_GAMMA) - _OFFSET + 1
_LAST = NBUCKETS - 1
_REPRESENTATIVE = [2 * GAMMA ** (i + _OFFSET) / (GAMMA + 1) for i in range(NBUCKETS)]
_log = math.log
_ceil = math.ceil


def bucket_of(seconds: float) -> int:
    """Index of the bucket holding ``seconds`` (clamped into range)."""
    if seconds <= MIN_VALUE:
        return 0
    if seconds >= MAX_VALUE:
        return _LAST
    return _ceil(_log(seconds) * _INV_LOG_GAMMA) - _OFFSET


def rank_of(q: float, count: int) -> int:
    """0-based rank of the q-quantile among ``count`` sorted values (lower order
    statistic), the definition the accuracy guarantee is stated against."""
    return int(q * (count - 1))


def quantiles_from_counts(
    counts: Sequence[int], total: int, qs: Iterable[float], vmax: float | None = None
) -> list[float]:
    """Quantile values (seconds) from dense bucket counts; NaN when empty.

    One cumulative pass, then a binary search per quantile. Results are capped at
    ``vmax`` (the exact maximum) when given, which keeps them within 1% too.
    """
    qs = list(qs)
    if total <= 0:
        return [math.nan] * len(qs)
    cumulative = list(accumulate(counts))
    out = []
    for q in qs:
        rank = rank_of(q, total)
        if vmax is not None and rank == total - 1:
            out.append(vmax)  # the top order statistic is known exactly
            continue
        value = _REPRESENTATIVE[min(bisect_right(cumulative, rank), _LAST)]
        out.append(min(value, vmax) if vmax is not None else value)
    return out


class LogHistogram:
    """Dense counts over the fixed layout, plus count and exact max."""

    __slots__ = ("count", "counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float, n: int = 1) -> None:
        self.counts[bucket_of(seconds)] += n
        self.count += n
        if seconds > self.max:
            self.max = seconds

    def add_sparse(self, sparse: Mapping[int, int], count: int | None = None) -> None:
        """Add bucket -> count pairs; ``count``: their sum, when the caller knows it."""
        counts = self.counts
        for bucket, n in sparse.items():
            counts[bucket] += n
        self.count += sum(sparse.values()) if count is None else count

    def subtract_sparse(self, sparse: Mapping[int, int], count: int | None = None) -> None:
        counts = self.counts
        for bucket, n in sparse.items():
            counts[bucket] -= n
        self.count -= sum(sparse.values()) if count is None else count

    def merge(self, other: LogHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.max = max(self.max, other.max)

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        return quantiles_from_counts(self.counts, self.count, qs, self.max or None)
