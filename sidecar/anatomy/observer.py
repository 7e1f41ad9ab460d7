"""The anatomy observer: what a request's latency is made of, per route, windowed.

Per stream (O(1)): the sidecar's own time (overhead) and the upstream's time (to the
first token) into rolling windows that the breach detector reads to name a cause; time
to first token and time per output token into their windows and histograms. Per unary
request only reported token counts: its upstream time (to the response headers) and
overhead come once a second from the metrics' per-route histograms (`unary.py`). The
windows are `percentiles.Percentiles` instances keyed like the latency ones: (route,
stream).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..histogram import HistogramSeries, native_index
from ..percentiles import Percentiles, Snapshot
from ..record import CLIENT_DISCONNECT, TimingRecord
from ..runtime.looplag import LoopLag
from .cause import SATURATED_S
from .metrics import AnatomyMetrics
from .unary import SCHEMA, UnaryWindows

SATURATION_SPAN_S = 2  # "saturated" while the worst loop lag of the last 2 s is > 100 ms


class Anatomy:
    """Observer. Linked to the latency percentiles (`link`), it ticks with them."""

    def __init__(self, windows_s: list[int], metrics: AnatomyMetrics) -> None:
        self.ttft = Percentiles(windows_s)
        self.tpot = Percentiles(windows_s)
        # read only by the `cause` of breach events, judged on the shortest window:
        # kept for that one (each window more is a merge per route every second)
        self.upstream = Percentiles(windows_s[:1])
        self.overhead = Percentiles(windows_s[:1])
        self._unary: UnaryWindows | None = None
        self._m = metrics
        self._ttft_h = metrics.ttft.labels
        self._tpot_h = metrics.tpot.labels
        self._output = metrics.tokens.output
        self._input = metrics.tokens.input

    def observe(self, record: TimingRecord) -> None:
        if record.stream:
            self._observe_stream(record)
        # unary requests: upstream and overhead come from the metrics' histograms
        # (`UnaryWindows`), only reported tokens are counted here
        tokens = record.output_tokens
        if tokens is not None:
            route = record.route
            self._output[route] = self._output.get(route, 0) + tokens
        tokens = record.input_tokens  # also alone: embeddings report prompt tokens only
        if tokens is not None:
            route = record.route
            self._input[route] = self._input.get(route, 0) + tokens

    def _observe_stream(self, record: TimingRecord) -> None:
        sent_at = record.sent_at
        if sent_at is None:
            return  # refused before the upstream
        route = record.route
        upstream_end = record.upstream_end
        overhead = None
        if upstream_end is not None:
            overhead = max(0.0, sent_at - record.start + record.end - upstream_end)
        if self._unary is not None:  # what `RequestMetrics` put in the shared series
            headers_at = record.headers_at
            self._unary.streamed(
                route,
                None if headers_at is None else native_index(headers_at - sent_at, SCHEMA),
                overhead,
            )
        if record.error == CLIENT_DISCONNECT:
            return  # never completed
        key = (route, True)  # upstream and overhead: per route only, `*` merged on demand
        if overhead is not None:
            self.overhead.add_key(key, overhead)
        first = record.first_token_at
        if first is not None:
            self.upstream.add_key(key, first - sent_at)
            ttft = first - record.start
            self.ttft.add(route, True, ttft)
            self._ttft_h(route).observe(ttft, record.trace_id)
        per_token = record.time_per_token
        if per_token is not None:
            self.tpot.add(route, True, per_token)
            self._tpot_h(route).observe(per_token, record.trace_id)

    def link(
        self,
        percentiles: Percentiles,
        route_series: Callable[[], Mapping[str, tuple[HistogramSeries, HistogramSeries]]],
    ) -> None:
        """Advance these windows with the latency ones, in the same tick; unary
        requests' upstream and overhead read from ``route_series`` (the per-route
        `sidecar_upstream_header_seconds` and `sidecar_overhead_seconds` series)."""
        self._unary = UnaryWindows(self.upstream, self.overhead, route_series)
        percentiles.linked.extend((self.ttft, self.tpot, self._unary))

    def sections(self) -> dict[str, Any]:
        """The `ttft` and `tpot` sections of `/percentiles`, shaped like `routes`."""
        return {"ttft": _by_route(self.ttft.snapshot()), "tpot": _by_route(self.tpot.snapshot())}


def _by_route(snap: Snapshot) -> dict[str, Any]:
    return {
        route: {str(w): s.as_json() for w, s in per_window.items()}
        for (route, _), per_window in sorted(snap.stats.items())
    }


def percentiles_document(snapshot: Snapshot, anatomy: Anatomy, lag: LoopLag) -> dict[str, Any]:
    """`/percentiles`: the latency sections, ``ttft`` and ``tpot``, and ``saturated``
    (with the lag it is judged on): while the event loop lags, every timestamp the
    process takes is late and requests wait unseen in the kernel."""
    doc = snapshot.as_json()
    doc.update(anatomy.sections())
    worst = lag.max_over(SATURATION_SPAN_S)
    doc["saturated"] = worst > SATURATED_S
    doc["loop_lag_max_ms"] = round(worst * 1000, 1)
    return doc
