"""The metric model: every `sidecar_*` metric of the SPEC, in one registry.

`RequestMetrics` is an observer (histograms, error counters: O(1) per record, with
labelled series cached; histogram storage is `histogram.HistogramSet`; the histograms
named in `NATIVE_HISTOGRAMS` also keep native buckets). The rolling quantiles are read
at scrape time by `QuantileCollector`. Exposition lives in `exposition.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .histogram import HistogramSeries, HistogramSet, NativeHistogramSeries
from .percentiles import QUANTILES, Snapshot
from .record import UPSTREAM_ERRORS, TimingRecord
from .routes import OTHER

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call] # no *_created series: they double cardinality

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SERIES_MAX = 1000  # label sets per histogram family before folding into route="other"
OVERFLOW_MAX = 100  # further label sets with route="other" before method/code fold too
_BOOL = {True: "true", False: "false"}
# The SPEC's native histograms (exposed with native buckets when scraped as protobuf);
# any histogram created through `Metrics._histogram` with one of these names gets them.
NATIVE_HISTOGRAMS = frozenset({
    "sidecar_request_duration_seconds",
    "sidecar_time_to_first_token_seconds",
    "sidecar_upstream_header_seconds",
})  # fmt: skip
NATIVE_SCHEMA = 5  # bucket growth 2^(1/32): within 1.08% of a bucket's middle
# 50 µs (a healthy sidecar) to 5 s (a saturated one): anatomy/unary.py reads them too
OVERHEAD_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                      0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
# sessions last from seconds (a refused call) to hours (a realtime conversation)
SESSION_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)


class Metrics:
    """Owns the registry and every metric; other components get handles from here."""

    def __init__(self, buckets_s: list[float]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        prometheus_client.ProcessCollector(registry=reg)
        prometheus_client.GCCollector(registry=reg)
        prometheus_client.PlatformCollector(registry=reg)
        self.request_duration = self.histogram(
            "sidecar_request_duration_seconds",
            "Request latency as the client saw it; streams: time to first body byte.",
            ["route", "method", "code", "stream"],
            buckets_s,
        )
        self.upstream_header = self.histogram(
            "sidecar_upstream_header_seconds",
            "Time until the upstream's response headers arrived.",
            ["route"],
            buckets_s,
        )
        self.overhead = self.histogram(
            "sidecar_overhead_seconds",
            "Time the sidecar itself added (total minus time waiting on the upstream).",
            ["route"],
            OVERHEAD_BUCKETS_S,
        )
        self.stream_duration = self.histogram(
            "sidecar_stream_duration_seconds",
            "Whole duration of streamed (text/event-stream) responses.",
            ["route"],
            buckets_s,
        )
        self.in_flight = Gauge(
            "sidecar_requests_in_flight", "Requests being proxied right now.", registry=reg
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors_total",
            "Upstream failures by kind (connect, timeout, reset).",
            ["route", "kind"],
            registry=reg,
        )
        self.breach_active = Gauge(
            "sidecar_breach_active",
            "1 while a latency breach is active (metric: latency, ttft, tpot).",
            ["route", "stream", "quantile", "severity", "metric"],
            registry=reg,
        )
        self.events = Counter(
            "sidecar_events_total",
            "Events raised, by type and severity.",
            ["type", "severity"],
            registry=reg,
        )
        self.events_suppressed = Counter(
            "sidecar_events_suppressed_total",
            "Events not raised because of rate limiting (slow_request floods).",
            ["type"],
            registry=reg,
        )
        self.deliveries = Counter(
            "sidecar_event_deliveries_total",
            "Event delivery attempts by sink and result (ok, retry, dropped).",
            ["sink", "result"],
            registry=reg,
        )
        self.connections_open = Gauge(
            "sidecar_connections_open",
            "Client connections open, per listener.",
            ["listener"],
            registry=reg,
        )
        self.connections_rejected = Counter(
            "sidecar_connections_rejected_total",
            "Client connections closed by a limit: connection_limit, header_timeout, "
            "stalled_reader, bad_request.",
            ["listener", "reason"],
            registry=reg,
        )
        self.series_overflow = Counter(
            "sidecar_metric_series_overflow_total",
            'Observations folded into route="other" because a histogram family was '
            "at its cap of label sets.",
            ["metric"],
            registry=reg,
        )
        self.queue_depth = Gauge(
            "sidecar_event_queue_depth", "Events waiting per sink.", ["sink"], registry=reg
        )
        self.websocket_handshake = self.histogram(
            "sidecar_websocket_handshake_seconds",
            "WebSocket (upgrade) handshakes: from the request to the upstream's 101 relayed.",
            ["route"],
            buckets_s,
        )
        self.websocket_session = self.histogram(
            "sidecar_websocket_session_seconds",
            "WebSocket session durations from the 101, by who closed: client, upstream "
            "(whose Close frame came first), shutdown, error (no Close frame).",
            ["route", "close"],
            SESSION_BUCKETS_S,
        )
        self.websocket_active = Gauge(
            "sidecar_websocket_active", "WebSocket sessions open right now.", registry=reg
        )
        self.websocket_bytes = Counter(
            "sidecar_websocket_bytes_total",
            "Bytes tunnelled in WebSocket sessions: in = client to upstream, out = back.",
            ["route", "direction"],
            registry=reg,
        )

    def histogram(
        self, name: str, doc: str, labels: list[str], buckets: Sequence[float]
    ) -> HistogramSet:
        native = NATIVE_SCHEMA if name in NATIVE_HISTOGRAMS else None
        histogram = HistogramSet(name, doc, labels, buckets, native_schema=native)
        self.registry.register(histogram)
        return histogram


class RequestMetrics:
    """Observer: one record -> histogram observations and error counts.

    Label values are bounded whatever clients send: routes by the labeler, methods
    to a known set (else ``other``), ``code`` to real statuses 100-599 (else
    ``other``), and each histogram family to `SERIES_MAX` label sets: past it a new
    label set is folded into ``route="other"`` (past `SERIES_MAX` + `OVERFLOW_MAX`,
    method and code become ``other`` too), counted in
    ``sidecar_metric_series_overflow_total{metric}``.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._children: dict[tuple[str, str, int, bool], HistogramSeries] = {}
        self._route_children: dict[str, tuple[HistogramSeries, HistogramSeries]] = {}
        self._stream_children: dict[str, HistogramSeries] = {}

    def route_series(self) -> Mapping[str, tuple[HistogramSeries, HistogramSeries]]:
        """Route -> its (upstream header, overhead) series, routes past the cap left out;
        native ones tracked (`take_gained` answers) from their first request."""
        return self._route_children

    def observe(self, record: TimingRecord) -> None:
        m = self._m
        route = record.route
        method = record.method if record.method in _METHODS else "other"
        key = (route, method, record.status, record.stream)
        duration = self._children.get(key)
        if duration is None:
            duration = self._duration_series(key)
        per_route = self._route_children.get(route)
        if per_route is None:
            per_route = self._per_route_series(route)
        header_h, overhead_h = per_route
        trace_id = record.trace_id
        duration.observe(record.latency, trace_id)
        sent_at = record.sent_at
        if sent_at is not None:
            headers_at = record.headers_at
            if headers_at is not None:
                header_h.observe(headers_at - sent_at, trace_id)
            upstream_end = record.upstream_end
            if upstream_end is not None:
                # the sidecar's own share: before handing the request over, plus after
                # the upstream body ended (the total minus time waiting on the upstream)
                overhead_h.observe(max(0.0, sent_at - record.start + record.end - upstream_end))
        if record.stream:
            stream_h = self._stream_children.get(route)
            if stream_h is None:
                stream_h = self._stream_series(route)
            stream_h.observe(record.end - record.start, trace_id)
        if record.error in UPSTREAM_ERRORS:
            m.upstream_errors.labels(
                route if route in self._route_children else OTHER, record.error
            ).inc()

    # The slow paths: first observation of a label set (cached), or overflow (not).

    def _duration_series(self, key: tuple[str, str, int, bool]) -> HistogramSeries:
        route, method, status, stream = key
        code = str(status) if 100 <= status <= 599 else OTHER
        family = self._m.request_duration
        if len(self._children) < SERIES_MAX:
            series = self._children[key] = family.labels(route, method, code, _BOOL[stream])
            return series
        self._m.series_overflow.labels(family.name).inc()
        if len(family) < SERIES_MAX + OVERFLOW_MAX:
            return family.labels(OTHER, method, code, _BOOL[stream])
        return family.labels(OTHER, OTHER, OTHER, _BOOL[stream])

    def _per_route_series(self, route: str) -> tuple[HistogramSeries, HistogramSeries]:
        m = self._m
        if len(self._route_children) < SERIES_MAX:
            series = self._route_children[route] = (
                m.upstream_header.labels(route),
                m.overhead.labels(route),
            )
            for one in series:  # read by `route_series`'s reader from the first request
                if isinstance(one, NativeHistogramSeries):
                    one.track()
            return series
        m.series_overflow.labels(m.upstream_header.name).inc()
        m.series_overflow.labels(m.overhead.name).inc()
        return m.upstream_header.labels(OTHER), m.overhead.labels(OTHER)

    def _stream_series(self, route: str) -> HistogramSeries:
        family = self._m.stream_duration
        if len(self._stream_children) < SERIES_MAX:
            series = self._stream_children[route] = family.labels(route)
            return series
        self._m.series_overflow.labels(family.name).inc()
        return family.labels(OTHER)


class WebSocketMetrics:
    """Session observer (`tunnel.SessionObserver`): handshakes, session ends, bytes."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def handshake(self, route: str, seconds: float) -> None:
        self._m.websocket_handshake.labels(route).observe(seconds)

    def counters(self, route: str) -> tuple[Callable[[int], None], Callable[[int], None]]:
        counter = self._m.websocket_bytes
        return counter.labels(route, "in").inc, counter.labels(route, "out").inc

    def session_end(self, route: str, close: str, seconds: float) -> None:
        self._m.websocket_session.labels(route, close).observe(seconds)


class QuantileCollector(Collector):
    """`sidecar_latency_rolling_seconds`, a summary, from the last percentile snapshot:
    quantiles over each rolling window, `_count` and `_sum` cumulative since start."""

    NAME = "sidecar_latency_rolling_seconds"

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        family = SummaryMetricFamily(
            self.NAME,
            "Rolling latency quantiles per route and window (1% relative accuracy); "
            "_count and _sum are cumulative.",
            labels=["route", "stream", "window"],
        )
        snap = self._snapshot()
        if snap is not None:
            for key, per_window in snap.stats.items():
                count, total = snap.totals.get(key, (0, 0.0))
                route, stream = key
                for window_s, stats in per_window.items():
                    labels = [route, _BOOL[stream], f"{window_s}s"]
                    if stats.count:
                        named = dict(zip(("route", "stream", "window"), labels, strict=True))
                        for q, value in zip(QUANTILES, stats.quantiles, strict=True):
                            family.samples.append(
                                Sample(self.NAME, {**named, "quantile": str(q)}, value)
                            )
                    family.add_metric(labels, count, total)
        yield family
