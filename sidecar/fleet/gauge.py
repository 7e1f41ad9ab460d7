"""`sidecar_fleet_latency_quantile_seconds` and `sidecar_fleet_instances`: exported
only while this sidecar holds the fleet lease, so exactly one sidecar of the fleet
exports them at a time and dashboards need no de-duplication."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..percentiles import QUANTILES
from .view import FleetView

_BOOL = {True: "true", False: "false"}


class FleetQuantileCollector(Collector):
    def __init__(self, view: FleetView, exporting: Callable[[], bool]) -> None:
        self._view = view
        self._exporting = exporting

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sidecar_fleet_latency_quantile_seconds",
            "Rolling latency quantiles of the whole fleet (every sidecar sharing "
            "SIDECAR_FLEET) per route and window, 1% relative accuracy; exported by one "
            "sidecar of the fleet at a time.",
            labels=["route", "stream", "window", "quantile"],
        )
        instances = GaugeMetricFamily(
            "sidecar_fleet_instances",
            "Sidecars that shared data into the fleet's shortest window; exported by one "
            "sidecar of the fleet at a time.",
        )
        if self._exporting() and self._view.read_at is not None:
            for (route, stream), per_window in self._view.snapshot().stats.items():
                for window_s, stats in per_window.items():
                    if not stats.count:
                        continue
                    for q, value in zip(QUANTILES, stats.quantiles, strict=True):
                        family.add_metric([route, _BOOL[stream], f"{window_s}s", str(q)], value)
            instances.add_metric([], len(self._view.instances))
        yield family
        yield instances
