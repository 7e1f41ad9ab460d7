"""The metric model: every `sidecar_*` metric of the SPEC, in one registry.

`RequestMetrics` is an observer (histograms, error counters: O(1) per record, with
labelled series cached; histogram storage is `registry.HistogramSet`). The rolling
quantiles are read at scrape time by `QuantileCollector`. Exposition lives in `exposition.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .histogram import HistogramSeries, HistogramSet
from .percentiles import QUANTILES, Snapshot
from .record import UPSTREAM_ERRORS, TimingRecord

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call] # no *_created series: they double cardinality

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BOOL = {True: "true", False: "false"}


class Metrics:
    """Owns the registry and every metric; other components get handles from here."""

    def __init__(self, buckets_s: list[float]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        prometheus_client.ProcessCollector(registry=reg)
        prometheus_client.GCCollector(registry=reg)
        prometheus_client.PlatformCollector(registry=reg)
        self.request_duration = self._histogram(
            "sidecar_request_duration_seconds",
            "Request latency as the client saw it; streams: time to first body byte.",
            ["route", "method", "code", "stream"],
            buckets_s,
        )
        self.upstream_header = self._histogram(
            "sidecar_upstream_header_seconds",
            "Time until the upstream's response headers arrived.",
            ["route"],
            buckets_s,
        )
        self.overhead = self._histogram(
            "sidecar_overhead_seconds",
            "Time the sidecar itself added (total minus time waiting on the upstream).",
            ["route"],
            (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
        )
        self.stream_duration = self._histogram(
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
        self.queue_depth = Gauge(
            "sidecar_event_queue_depth", "Events waiting per sink.", ["sink"], registry=reg
        )

    def _histogram(
        self, name: str, doc: str, labels: list[str], buckets: Sequence[float]
    ) -> HistogramSet:
        histogram = HistogramSet(name, doc, labels, buckets)
        self.registry.register(histogram)
        return histogram


class RequestMetrics:
    """Observer: one record -> histogram observations and error counts."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._children: dict[tuple[str, str, int, bool], HistogramSeries] = {}
        self._route_children: dict[
            str, tuple[HistogramSeries, HistogramSeries, HistogramSeries]
        ] = {}

    def observe(self, record: TimingRecord) -> None:
        m = self._m
        route = record.route
        method = record.method if record.method in _METHODS else "other"
        key = (route, method, record.status, record.stream)
        duration = self._children.get(key)
        if duration is None:
            duration = self._children[key] = m.request_duration.labels(
                route, method, str(record.status), _BOOL[record.stream]
            )
        per_route = self._route_children.get(route)
        if per_route is None:
            per_route = self._route_children[route] = (
                m.upstream_header.labels(route),
                m.overhead.labels(route),
                m.stream_duration.labels(route),
            )
        header_h, overhead_h, stream_h = per_route
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
            stream_h.observe(record.end - record.start, trace_id)
        if record.error in UPSTREAM_ERRORS:
            m.upstream_errors.labels(route, record.error).inc()


class QuantileCollector(Collector):
    """`sidecar_latency_quantile_seconds` from the last percentile snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sidecar_latency_quantile_seconds",
            "Rolling latency quantiles per route and window (1% relative accuracy).",
            labels=["route", "stream", "window", "quantile"],
        )
        snap = self._snapshot()
        if snap is not None:
            for (route, stream), per_window in snap.stats.items():
                for window_s, stats in per_window.items():
                    if not stats.count:
                        continue
                    for q, value in zip(QUANTILES, stats.quantiles, strict=True):
                        family.add_metric([route, _BOOL[stream], f"{window_s}s", str(q)], value)
        yield family
