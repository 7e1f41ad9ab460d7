"""`sidecar_target_*`, `sidecar_event_loop_lag_seconds` and the listen-queue counters,
read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .netstat import listen_queue
from .stats import RuntimeStats


class RuntimeCollector(Collector):
    """`sidecar_target_*` and `sidecar_event_loop_lag_seconds` at scrape time (the
    scrape already runs on a worker thread)."""

    def __init__(self, stats: RuntimeStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "sidecar_event_loop_lag_seconds",
            "How late the sidecar's event loop runs a timer (current, and max over 1 min).",
            labels=["window"],
        )
        lag.add_metric(["current"], self._stats.lag.current)
        lag.add_metric(["1m_max"], self._stats.lag.max_1m)
        yield lag
        queue = listen_queue()
        if queue is not None:
            for name, doc, value in (
                ("sidecar_listen_overflows", "Connections the kernel's accept queue had no "
                 "room for (TcpExt ListenOverflows of the network namespace).", queue[0]),
                ("sidecar_listen_drops", "Connection requests dropped at a listening socket "
                 "(TcpExt ListenDrops of the network namespace).", queue[1]),
            ):  # fmt: skip
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], float(value))
                yield counter
        sampled = self._stats.sample().get("target")
        if sampled is None:  # no target configured: no sidecar_target_* series at all
            return
        target = sampled
        up = GaugeMetricFamily(
            "sidecar_target_up", "1 when the gateway process was found and read."
        )
        up.add_metric([], 1.0 if target.get("pid") else 0.0)
        yield up
        gauges = (
            ("sidecar_target_rss_bytes", "rss_bytes", "Gateway resident set size."),
            ("sidecar_target_threads", "threads", "Gateway OS threads."),
            ("sidecar_target_open_fds", "open_fds", "Gateway open file descriptors."),
            ("sidecar_target_connections", "connections", "Gateway inet connections."),
        )
        for name, key, doc in gauges:
            if target.get(key) is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(target[key]))
                yield g
        if target.get("cpu_seconds") is not None:
            c = CounterMetricFamily(
                "sidecar_target_cpu_seconds", "Gateway CPU time (user + system)."
            )
            c.add_metric([], float(target["cpu_seconds"]))
            yield c
