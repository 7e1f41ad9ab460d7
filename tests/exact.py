"""Exact order statistics: the truth the sketch's percentiles are checked against."""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.sketch import rank_of


def exact(values: Iterable[float], q: float) -> float:
    """The q-quantile of ``values`` as the SPEC defines it (the lower order statistic)."""
    s = sorted(values)
    return s[rank_of(q, len(s))]


# The sidecar's clock stops when its handler ends, just after it wrote the last byte:
# a request can take it a little longer than its client saw it take (microseconds;
# more while the event loop is busy). A 20-run loop saw a fleet p99 0.07 ms above the
# client's exact p99 plus the sketch's 1%.
END_SLACK_S = 0.005


def sandwich_ms(
    upstream_times: Iterable[float], client_times: Iterable[float], q: float
) -> tuple[float, float]:
    """Where the sidecar's q-quantile (ms) must lie: between the exact quantile of what
    the upstream took and of what the clients saw (plus `END_SLACK_S`), each widened by
    the sketch's 1%."""
    low = exact(upstream_times, q) * 1000 * 0.99
    high = (exact(client_times, q) + END_SLACK_S) * 1000 * 1.01
    return low, high


def max_bound_ms(client_times: Iterable[float]) -> float:
    """The highest the sidecar's max (ms) may be: the clients' plus `END_SLACK_S`, +1%."""
    return (max(client_times) + END_SLACK_S) * 1000 * 1.01
