"""Exact order statistics: the truth the sketch's percentiles are checked against."""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.sketch import rank_of


def exact(values: Iterable[float], q: float) -> float:
    """The q-quantile of ``values`` as the SPEC defines it (the lower order statistic)."""
    s = sorted(values)
    return s[rank_of(q, len(s))]
