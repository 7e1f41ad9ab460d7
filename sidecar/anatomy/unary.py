"""The upstream and overhead windows of unary requests, derived once a second from the
per-route histograms the metrics observer fills anyway: no work per unary request.

Both histograms hold every request of a route, unary and streams. Once a tick
`UnaryWindows` takes what each route's series gained since the last tick, takes away
what the route's streams put there in the same tick (the anatomy observer reports each
stream with `streamed`, so the subtraction is exact) and adds the rest to the
``(route, False)`` sub-windows of the anatomy's upstream and overhead percentiles:

* upstream, from `sidecar_upstream_header_seconds` (native, schema 5: buckets 2.2%
  wide; a copy of a route's native counts per tick, diffed with the last one:
  `NativeHistogramSeries.take_gained`), each bucket counted at its middle: within
  about 2% (the bucket, then the windows' 1%);
* overhead, from the classic buckets of `sidecar_overhead_seconds` (a copy of a
  route's ~17 counts per tick), each bucket counted at its geometric middle: to the
  bucket (each a factor 2 to 2.5 wide). Enough for the `cause` rule, which asks whether
  the sidecar's own time is a fifth of a breaching value, and what keeps the overhead
  of a unary request at one classic observation (native buckets cost 5k instructions).

What is lost: a second of a route's upstream data when its series lowers its
resolution (past 480 buckets: values spanning more than 15 octaves), and routes beyond
the metrics' series cap (their series fold into ``route="other"``).
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..histogram import ZERO_INDEX, HistogramSeries, NativeHistogramSeries
from ..percentiles import Key, Percentiles
from ..sketch import bucket_of

SCHEMA = 5  # metrics.NATIVE_SCHEMA: the resolution `streamed` counts in
RouteSeries = Callable[[], Mapping[str, tuple[HistogramSeries, HistogramSeries]]]


class UnaryWindows:
    """Fills the unary keys of ``upstream`` and ``overhead``, then ticks them; ticked
    with the latency percentiles (`Percentiles.linked`)."""

    def __init__(self, upstream: Percentiles, overhead: Percentiles, route_series: RouteSeries):
        self.upstream = upstream
        self.overhead = overhead
        self._route_series = route_series
        # per route, this tick's streams: upstream header native index -> count, and
        # their overhead values
        self._streamed: dict[str, tuple[dict[int, int], list[float]]] = {}
        self._classic: dict[str, list[int]] = {}  # route -> overhead counts, last tick

    def streamed(self, route: str, header: int | None, overhead: float | None) -> None:
        """A stream put its upstream header time (native index at `SCHEMA`,
        `histogram.native_index`) and its overhead into the route's series: not unary,
        to be taken away."""
        pending = self._streamed.get(route)
        if pending is None:
            pending = self._streamed[route] = ({}, [])
        if header is not None:
            h = pending[0]
            h[header] = h.get(header, 0) + 1
        if overhead is not None:
            pending[1].append(overhead)

    def tick(self) -> None:
        streamed, self._streamed = self._streamed, {}
        last = self._classic
        for route, (header_s, overhead_s) in self._route_series().items():
            minus = streamed.get(route)
            key = (route, False)
            if isinstance(header_s, NativeHistogramSeries):
                self._add_native(header_s.take_gained(), minus[0] if minus else {}, key)
            counts = overhead_s.snapshot()[0]
            before = last.get(route)
            if before != counts:
                last[route] = counts
                self._add_classic(overhead_s.bounds, counts, before, minus, key)
        self.upstream.tick()
        self.overhead.tick()

    def _add_native(
        self, changes: tuple[int, dict[int, int]] | None, minus: dict[int, int], key: Key
    ) -> None:
        if changes is None:
            return
        schema, gained = changes
        if not gained:
            return
        shift = SCHEMA - schema
        for index, n in minus.items():
            if index != ZERO_INDEX and shift:
                index = -((-index) >> shift)  # ceil(index / 2^shift): the coarser bucket
            left = gained.get(index, 0) - n
            if left > 0:
                gained[index] = left
            else:
                gained.pop(index, None)
        _put(self.upstream, key, gained.items(), functools.partial(_native_bucket, schema))

    def _add_classic(
        self,
        bounds: Sequence[float],
        counts: list[int],
        before: list[int] | None,
        minus: tuple[dict[int, int], list[float]] | None,
        key: Key,
    ) -> None:
        gained = (
            list(counts) if before is None else [a - b for a, b in zip(counts, before, strict=True)]
        )
        if minus:
            for value in minus[1]:
                gained[bisect_left(bounds, value)] -= 1
        table = _classic_table(tuple(bounds))
        _put(self.overhead, key, enumerate(gained), table.__getitem__)


def _put(
    windows: Percentiles,
    key: Key,
    gained: Iterable[tuple[int, int]],
    locate: Callable[[int], tuple[int, float]],
) -> None:
    """Add (index, count) pairs to ``key``'s sub-window; ``locate(index)`` is the
    sketch bucket and upper bound of an index. Counts of 0 or less are skipped."""
    sub = None
    for index, n in gained:
        if n <= 0:
            continue
        if sub is None:
            sub = windows.pending(key)
        bucket, value = locate(index)
        counts = sub.counts
        counts[bucket] = counts.get(bucket, 0) + n
        sub.count += n
        if value > sub.max:
            sub.max = value


@functools.lru_cache(maxsize=4096)
def _native_bucket(schema: int, index: int) -> tuple[int, float]:
    """The sketch bucket of a native bucket's middle, and the native bucket's upper bound."""
    if index == ZERO_INDEX:
        return bucket_of(0.0), 0.0
    width = 2.0**-schema
    return bucket_of(2.0 ** ((index - 0.5) * width)), 2.0 ** (index * width)


@functools.lru_cache(maxsize=16)
def _classic_table(bounds: tuple[float, ...]) -> list[tuple[int, float]]:
    """Per classic bucket (the last is +Inf): the sketch bucket of its geometric middle
    and its upper bound (+Inf: twice the last bound, for both)."""
    table = []
    low = bounds[0] / 2
    for upper in (*bounds, bounds[-1] * 2):
        middle = math.sqrt(low * upper) if low < upper else upper
        table.append((bucket_of(middle), upper))
        low = upper
    return table
