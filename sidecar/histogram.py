"""Loop-owned histogram storage, exposed through prometheus-client.

prometheus-client's `Histogram.observe` takes a lock per value and costs several µs;
every request observation here happens on the event-loop thread, so the counts can be
plain containers: observing is a bisect and a few additions. `HistogramSet.collect`
builds prometheus-client `HistogramMetricFamily`s from a copy of the counts at scrape
time (scrapes run on a worker thread; a list or dict copy is atomic under the GIL, and
`_count` is derived from the same copy as the buckets, so each series stays
self-consistent). Exposition, text or OpenMetrics with exemplars, remains
prometheus-client's; the protobuf exposition (`exposition_pb.py`) adds native buckets.

Native buckets (Prometheus native histograms), when a `HistogramSet` has a
``native_schema``: base-2 exponential buckets, the upper bound of bucket ``i`` being
``2 ** (i * 2 ** -schema)``; at schema 5 a bucket spans a factor 2^(1/32) = 1.0219, so
every value in a bucket is within 1.08% of the bucket's (geometric) middle. The index
is ``ceil(log2(v) * 2**schema)``: exact for powers of two (log2 is exact there); for a
value within a few ulps (1e-15 relative) of another bound, rounding may pick the
neighbour bucket, which no quantile can notice. In CPython this is 3x faster than
client_golang's frexp + bisect over the octave's bounds (70 vs 240 ns; `bucket_index`
keeps that exact method as the reference). Buckets are sparse (a dict) and bounded per
series: past ``native_max_buckets`` the resolution halves (schema - 1, adjacent buckets
merged), as client_golang does with NativeHistogramMaxBucketNumber.

A native series keeps classic and native counts in ONE dict (disjoint integer key
ranges), so one atomic copy gives classic buckets, native buckets and count that agree.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

ZERO_THRESHOLD = 2.0**-128  # client_golang's DefNativeHistogramZeroThreshold
DEFAULT_MAX_BUCKETS = 480  # 15 octaves at schema 5 before the resolution is reduced
MIN_SCHEMA = -4  # the lowest schema Prometheus accepts

# key ranges inside a native series' dict (native bucket indices stay below 2**20 for
# any schema <= 8: the bucket of the largest float64 is 1024 * 2**schema)
_NEGATIVE = 1 << 36  # negative bucket k is stored at _NEGATIVE + k
_ZERO = 1 << 38
_SCHEMA = 1 << 39  # holds the current schema, so a copy knows its own resolution
_CLASSIC = 1 << 40  # classic bucket i is stored at _CLASSIC + i
_SPAN = 1 << 20
_INF = math.inf
_frexp = math.frexp
_log2 = math.log2
_ceil = math.ceil

Exemplars = list[tuple[str, float, float] | None]


class HistogramSeries:
    """One label set: sum, last exemplar per classic bucket, and the counts (kept by
    the subclass); `snapshot` reads the counts consistently from any thread."""

    __slots__ = ("bounds", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.sum = 0.0
        self.exemplars: Exemplars = [None] * (len(bounds) + 1)

    def observe(self, value: float, trace_id: str | None = None) -> None:
        raise NotImplementedError

    def snapshot(self) -> tuple[list[int], dict[int, int] | None]:
        """Per-bucket classic counts (the last is +Inf) and, for a native series, the
        copy they were read from (`native_buckets` decodes it)."""
        raise NotImplementedError


class ClassicHistogramSeries(HistogramSeries):
    """Classic buckets only: per-bucket counts in a list."""

    __slots__ = ("counts",)

    def __init__(self, bounds: Sequence[float]) -> None:
        super().__init__(bounds)
        self.counts = [0] * (len(bounds) + 1)

    def observe(self, value: float, trace_id: str | None = None) -> None:
        i = bisect_left(self.bounds, value)  # first bucket with value <= le
        self.counts[i] += 1
        self.sum += value
        if trace_id is not None:
            self.exemplars[i] = (trace_id, value, time.time())

    def snapshot(self) -> tuple[list[int], dict[int, int] | None]:
        return self.counts[:], None


@dataclass(frozen=True, slots=True)
class NativeBuckets:
    """A native histogram's buckets as the exposition formats carry them."""

    schema: int
    zero_threshold: float
    zero_count: int
    positive_spans: list[tuple[int, int]]  # (offset, length)
    positive_deltas: list[int]
    negative_spans: list[tuple[int, int]]
    negative_deltas: list[int]

    @property
    def count(self) -> int:
        """Observations in the buckets (NaN goes to none)."""
        return (
            self.zero_count
            + sum(_absolute(self.positive_deltas))
            + sum(_absolute(self.negative_deltas))
        )

    def buckets(self) -> dict[int, int]:
        """Positive bucket index -> count (populated buckets only)."""
        return {k: n for k, n in _expand(self.positive_spans, self.positive_deltas) if n}


def fraction_bounds(schema: int) -> tuple[float, ...]:
    """The 2^schema bucket bounds within one octave [0.5, 1), for frexp fractions."""
    n = 1 << schema
    return tuple(2.0 ** (j / n - 1) for j in range(n))


def bucket_index(value: float, schema: int) -> int:
    """Native bucket index of a positive finite ``value``: upper bound 2^(i * 2^-schema)."""
    frac, exp = _frexp(value)
    if schema > 0:
        return bisect_left(fraction_bounds(schema), frac) + ((exp - 1) << schema)
    key = exp - 1 if frac == 0.5 else exp
    return (key + (1 << -schema) - 1) >> -schema


def upper_bound(index: int, schema: int) -> float:
    return float(2.0 ** (index * 2.0**-schema))


class NativeHistogramSeries(HistogramSeries):
    """A series with native buckets next to its classic ones (see the module doc)."""

    __slots__ = ("_ckeys", "_counts", "_factor", "_limit", "_schema", "_taken")

    def __init__(self, bounds: Sequence[float], schema: int, max_buckets: int) -> None:
        super().__init__(bounds)
        self._schema = schema
        self._factor = 2.0**schema  # index = ceil(log2(v) * 2^schema)
        self._ckeys = tuple(_CLASSIC + i for i in range(len(bounds) + 1))
        counts: dict[int, int] = dict.fromkeys(self._ckeys, 0)
        counts[_ZERO] = 0
        counts[_SCHEMA] = schema
        self._limit = len(counts) + max_buckets
        self._counts = counts
        self._taken: dict[int, int] | None = None  # the counts as of `take_gained`

    def track(self) -> None:
        """Make `take_gained` answer from now on."""
        if self._taken is None:
            self._taken = self._counts.copy()

    def take_gained(self) -> tuple[int, dict[int, int]] | None:
        """(schema, bucket index -> count gained since the previous call or `track`,
        finite positive buckets and `ZERO_INDEX` for the zero bucket), or None when
        the resolution changed in between (what was gained then is dropped) or the
        series was not tracked. The difference of two copies of the counts, taken by
        the reader (once a second): nothing more per observation. Loop thread only."""
        counts = self._counts.copy()
        taken, self._taken = self._taken, counts
        if taken is None or taken[_SCHEMA] != counts[_SCHEMA]:
            return None
        gained: dict[int, int] = {}
        overflow = int(1024 * self._factor) + 1  # +Inf's bucket (`_key`): left out
        # the (key, count) pairs that changed, found in C: a loop over those alone
        for key, n in counts.items() - taken.items():
            if -_SPAN < key < overflow or key == _ZERO:
                gained[key] = n - taken.get(key, 0)
        return counts[_SCHEMA], gained

    def observe(self, value: float, trace_id: str | None = None) -> None:
        i = bisect_left(self.bounds, value)
        counts = self._counts
        counts[self._ckeys[i]] += 1
        self.sum += value
        if ZERO_THRESHOLD < value < _INF:
            key = _ceil(_log2(value) * self._factor)
            try:
                counts[key] += 1
            except KeyError:
                self._add_bucket(key)
        else:
            self._observe_rare(value)
        if trace_id is not None:
            self.exemplars[i] = (trace_id, value, time.time())

    def _add_bucket(self, key: int) -> None:
        self._counts[key] = 1
        if len(self._counts) > self._limit:
            self._reduce()

    def _key(self, magnitude: float) -> int:
        if magnitude == _INF:  # the overflow bucket, above the one holding max float64
            return int(1024 * self._factor) + 1
        return _ceil(_log2(magnitude) * self._factor)

    def _observe_rare(self, value: float) -> None:
        """Zero bucket, negative values, +Inf; NaN counts in no native bucket."""
        counts = self._counts
        if -ZERO_THRESHOLD <= value <= ZERO_THRESHOLD:
            counts[_ZERO] += 1
            return
        if value > 0:
            key = self._key(value)
        elif value < 0:
            key = _NEGATIVE + self._key(-value)
        else:
            return  # NaN
        if key in counts:
            counts[key] += 1
        else:
            self._add_bucket(key)

    def _reduce(self) -> None:
        """Halve the resolution until the bucket count fits: bucket i of schema s lies
        in bucket ceil(i / 2) of schema s - 1, so neighbours merge."""
        counts = self._counts
        while len(counts) > self._limit and self._schema > MIN_SCHEMA:
            merged: dict[int, int] = {}
            for key, n in counts.items():
                if -_SPAN < key < _SPAN:
                    key = (key + 1) >> 1
                elif _NEGATIVE - _SPAN < key < _NEGATIVE + _SPAN:
                    key = _NEGATIVE + ((key - _NEGATIVE + 1) >> 1)
                merged[key] = merged.get(key, 0) + n
            self._schema -= 1
            self._factor = 2.0**self._schema
            merged[_SCHEMA] = self._schema
            counts = merged
        self._counts = counts  # one rebinding: a concurrent copy sees old or new, whole

    def snapshot(self) -> tuple[list[int], dict[int, int] | None]:
        counts = self._counts.copy()  # atomic under the GIL: one consistent state
        return [counts[k] for k in self._ckeys], counts


ZERO_INDEX = _ZERO  # the zero bucket's key in `take_gained`'s answer


def native_index(value: float, schema: int) -> int:
    """The key `NativeHistogramSeries.observe` counts a value >= 0 under: its positive
    bucket, or `ZERO_INDEX` at or below the zero threshold."""
    if value <= ZERO_THRESHOLD:
        return _ZERO
    return _ceil(_log2(value) * 2.0**schema)


def native_buckets(counts: Mapping[int, int]) -> NativeBuckets:
    """Decode a native series' snapshot (done only when a scrape asks for protobuf)."""
    positive: list[tuple[int, int]] = []
    negative: list[tuple[int, int]] = []
    for key, n in counts.items():
        if -_SPAN < key < _SPAN:
            positive.append((key, n))
        elif _NEGATIVE - _SPAN < key < _NEGATIVE + _SPAN:
            negative.append((key - _NEGATIVE, n))
    positive.sort()
    negative.sort()
    pos_spans, pos_deltas = _spans(positive)
    neg_spans, neg_deltas = _spans(negative)
    return NativeBuckets(
        counts[_SCHEMA], ZERO_THRESHOLD, counts[_ZERO], pos_spans, pos_deltas, neg_spans, neg_deltas
    )


def _spans(items: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """Sorted (index, count) -> spans and deltas; gaps of up to 2 empty buckets are
    carried as zeros (cheaper than a new span), as client_golang does."""
    spans: list[tuple[int, int]] = []
    deltas: list[int] = []
    prev_index = 0
    prev_count = 0
    for index, n in items:
        gap = index - prev_index - 1
        if not spans:
            spans.append((index, 1))
        elif gap <= 2:
            for _ in range(gap):
                deltas.append(-prev_count)
                prev_count = 0
            offset, length = spans[-1]
            spans[-1] = (offset, length + gap + 1)
        else:
            spans.append((gap, 1))
        deltas.append(n - prev_count)
        prev_index, prev_count = index, n
    return spans, deltas


def _absolute(deltas: Sequence[int]) -> Iterator[int]:
    n = 0
    for d in deltas:
        n += d
        yield n


def _expand(spans: Sequence[tuple[int, int]], deltas: Sequence[int]) -> Iterator[tuple[int, int]]:
    counts = _absolute(deltas)
    index = 0
    for i, (offset, length) in enumerate(spans):
        index = offset if i == 0 else index + offset + 1
        for j in range(length):
            yield index + j, next(counts)
        index += length - 1


class NativeHistogramFamily(HistogramMetricFamily):
    """A `HistogramMetricFamily` that also carries each series' native buckets (read by
    the protobuf exposition; the text formats show the classic buckets only)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels=labels)
        self.labelnames = tuple(labels)
        self.native: dict[tuple[str, ...], dict[int, int]] = {}  # label values -> snapshot

    def native_of(self, labels: Mapping[str, str]) -> NativeBuckets | None:
        counts = self.native.get(tuple(labels.get(n, "") for n in self.labelnames))
        return None if counts is None else native_buckets(counts)


class HistogramSet(Collector):
    """A histogram metric with labels; register it in a CollectorRegistry.

    With ``native_schema`` (0..8) every series also keeps native buckets.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        *,
        native_schema: int | None = None,
        native_max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if native_schema is not None and not 0 <= native_schema <= 8:
            raise ValueError(f"native_schema must be within 0..8, not {native_schema}")
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.native_schema = native_schema
        self.native_max_buckets = native_max_buckets
        self._le = [str(floatToGoString(b)) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}

    def __len__(self) -> int:
        """The number of label sets."""
        return len(self._series)

    def labels(self, *values: str) -> HistogramSeries:
        series = self._series.get(values)
        if series is None:
            if self.native_schema is None:
                series = ClassicHistogramSeries(self.bounds)
            else:
                series = NativeHistogramSeries(
                    self.bounds, self.native_schema, self.native_max_buckets
                )
            self._series[values] = series
        return series

    def collect(self) -> Iterator[Metric]:
        family: HistogramMetricFamily
        if self.native_schema is None:
            family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        else:
            family = NativeHistogramFamily(self.name, self.documentation, self.labelnames)
        for values, series in list(self._series.items()):
            counts, native = series.snapshot()
            exemplars = series.exemplars[:]
            total = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for le, n, ex in zip(self._le, counts, exemplars, strict=True):
                total += n
                if ex is None:
                    buckets.append((le, float(total)))
                else:
                    buckets.append((le, float(total), Exemplar({"trace_id": ex[0]}, ex[1], ex[2])))
            family.add_metric(list(values), buckets, series.sum)
            if native is not None and isinstance(family, NativeHistogramFamily):
                family.native[values] = native
        yield family
