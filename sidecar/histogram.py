"""Loop-owned histogram storage, exposed through prometheus-client.

prometheus-client's `Histogram.observe` takes a lock per value and costs several µs;
every request observation here happens on the event-loop thread, so the counts can be
plain lists: observing is a bisect and two additions. `HistogramSet.collect` builds
prometheus-client `HistogramMetricFamily`s from a copy of the counts at scrape time
(scrapes run on a worker thread; a list copy is atomic under the GIL, and `_count` is
derived from the same copy as the buckets, so each series stays self-consistent).
Exposition, text or OpenMetrics with exemplars, remains prometheus-client's.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


class HistogramSeries:
    """One label set: per-bucket counts (the last is +Inf), sum, last exemplar per bucket."""

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.exemplars: list[tuple[str, float, float] | None] = [None] * (len(bounds) + 1)

    def observe(self, value: float, trace_id: str | None = None) -> None:
        i = bisect_left(self.bounds, value)  # first bucket with value <= le
        self.counts[i] += 1
        self.sum += value
        if trace_id is not None:
            self.exemplars[i] = (trace_id, value, time.time())


class HistogramSet(Collector):
    """A histogram metric with labels; register it in a CollectorRegistry."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._le = [str(floatToGoString(b)) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}

    def __len__(self) -> int:
        """The number of label sets."""
        return len(self._series)

    def labels(self, *values: str) -> HistogramSeries:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = HistogramSeries(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self._series.items()):
            counts = series.counts[:]
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
        yield family
