"""The upstream and overhead windows of unary requests, derived once a second from the
per-route histograms the metrics observer fills anyway.

`sidecar_upstream_header_seconds` and `sidecar_overhead_seconds` are native histograms
(schema 5: buckets 2.2% wide) per route, unary requests and streams together. Each
route's two series keep what their buckets gained since the last tick
(`NativeHistogramSeries.track`: one dict increment per observation, the bucket already
computed). Once a tick `UnaryWindows` takes those gains, takes away what the route's
streams put there in the same tick (the anatomy observer reports each stream with
`streamed`, so the subtraction is exact) and adds the rest to the ``(route, False)``
sub-windows of the anatomy's upstream and overhead percentiles. A native bucket is
counted at its middle, so these quantiles are within 1.1% of the truth on top of the
windows' own 1% (about 2% in all): ample for the `cause` rule's shares. What is lost:
a second of a route's data when its series lowers its resolution (past 480 buckets:
values spanning more than 15 octaves), and routes beyond the metrics' series cap (their
series fold into ``route="other"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..histogram import ZERO_INDEX, HistogramSeries, NativeHistogramSeries
from ..percentiles import Percentiles
from ..sketch import bucket_of

SCHEMA = 5  # metrics.NATIVE_SCHEMA: the resolution `streamed` counts in


class UnaryWindows:
    """Fills the unary keys of ``upstream`` and ``overhead``, then ticks them; ticked
    with the latency percentiles (`Percentiles.linked`)."""

    def __init__(
        self,
        upstream: Percentiles,
        overhead: Percentiles,
        route_series: Callable[[], Mapping[str, tuple[HistogramSeries, HistogramSeries]]],
    ) -> None:
        self.upstream = upstream
        self.overhead = overhead
        self._route_series = route_series
        # per route, this tick's streams: (upstream header, overhead) bucket -> count
        self._streamed: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
        # schema -> native index -> (sketch bucket, upper bound), filled as met
        self._buckets: dict[int, dict[int, tuple[int, float]]] = {}

    def streamed(self, route: str, header: int | None, overhead: int | None) -> None:
        """A stream put these native indices (`histogram.native_index` at `SCHEMA`) into
        the route's series: not unary, to be taken away."""
        pending = self._streamed.get(route)
        if pending is None:
            pending = self._streamed[route] = ({}, {})
        if header is not None:
            h = pending[0]
            h[header] = h.get(header, 0) + 1
        if overhead is not None:
            o = pending[1]
            o[overhead] = o.get(overhead, 0) + 1

    def tick(self) -> None:
        streamed, self._streamed = self._streamed, {}
        for route, (header_s, overhead_s) in self._route_series().items():
            if not (
                isinstance(header_s, NativeHistogramSeries)
                and isinstance(overhead_s, NativeHistogramSeries)
            ):
                continue
            minus = streamed.get(route, ({}, {}))
            key = (route, False)
            self._add(self.upstream, key, header_s.take_gained(), minus[0])
            self._add(self.overhead, key, overhead_s.take_gained(), minus[1])
        self.upstream.tick()
        self.overhead.tick()

    def _add(
        self,
        windows: Percentiles,
        key: tuple[str, bool],
        changes: tuple[int, dict[int, int]] | None,
        minus: dict[int, int],
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
        if not gained:
            return
        table = self._buckets.get(schema)
        if table is None:
            table = self._buckets[schema] = {}
        counts: dict[int, int] = {}
        total = 0
        top = 0.0
        for index, n in gained.items():
            got = table.get(index)
            if got is None:
                got = table[index] = _sketch_bucket(schema, index)
            bucket, value = got
            counts[bucket] = counts.get(bucket, 0) + n
            total += n
            if value > top:
                top = value
        windows.add_counts(key, counts, total, top)


def _sketch_bucket(schema: int, index: int) -> tuple[int, float]:
    """The sketch bucket of a native bucket's middle, and the native bucket's upper bound."""
    if index == ZERO_INDEX:
        return bucket_of(0.0), 0.0
    width = 2.0**-schema
    return bucket_of(2.0 ** ((index - 0.5) * width)), 2.0 ** (index * width)
