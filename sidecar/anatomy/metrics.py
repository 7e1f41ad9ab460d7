"""The anatomy's Prometheus metrics: time to first token, time per output token, tokens.

Histograms are the loop-owned `histogram.HistogramSet`; the token counters are plain
per-route integers on the loop, read at scrape time by `TokenCounters` (a
prometheus-client `Counter` takes a lock per increment).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..histogram import HistogramSet
from ..metrics import Metrics

TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class TokenCounters(Collector):
    """`sidecar_output_tokens_total` and `sidecar_input_tokens_total`, per route."""

    def __init__(self) -> None:
        self.output: dict[str, int] = {}
        self.input: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        for name, doc, counts in (
            ("sidecar_output_tokens", "Output (completion) tokens reported by the upstream "
             "in usage.", self.output),
            ("sidecar_input_tokens", "Input (prompt) tokens reported by the upstream in "
             "usage.", self.input),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=["route"])
            for route, n in list(counts.items()):
                family.add_metric([route], float(n))
            yield family


class AnatomyMetrics:
    """Registers the anatomy's metrics in the sidecar's registry."""

    def __init__(self, metrics: Metrics, buckets_s: list[float]) -> None:
        reg = metrics.registry
        # through Metrics.histogram: a SPEC native histogram (native buckets with protobuf)
        self.ttft = metrics.histogram(
            "sidecar_time_to_first_token_seconds",
            "Streams: time from receiving the request to the first output event "
            "(first body byte when none can be told apart).",
            ["route"],
            buckets_s,
        )
        self.tpot = HistogramSet(
            "sidecar_time_per_output_token_seconds",
            "Streams: (last byte - first token) / (completion_tokens - 1) when the upstream "
            "reports usage, else time per output chunk (SSE event).",
            ["route"],
            TPOT_BUCKETS_S,
        )
        self.tokens = TokenCounters()
        for collector in (self.tpot, self.tokens):
            reg.register(collector)
