"""The protobuf exposition: every family a prometheus-client registry yields, as
`io.prometheus.client.MetricFamily` messages (delimited), so a scraper that negotiates
protobuf loses nothing the text formats carry.

Mapping (the one Prometheus' own parsers expect): counters keep their ``_total`` name
(and ``_created`` as created_timestamp); info -> gauge ``<name>_info``; stateset ->
gauge; unknown -> untyped; summary quantiles, ``_count`` and ``_sum`` -> one Summary;
histogram ``_bucket`` / ``_count`` / ``_sum`` -> one Histogram, with the native buckets
of `histogram.NativeHistogramFamily` next to the classic ones; gauge histograms ->
GAUGE_HISTOGRAM (``_gcount`` / ``_gsum``). Exemplars and sample timestamps are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample

from . import promproto as pb
from .histogram import NativeBuckets, NativeHistogramFamily

_TYPES = {
    "counter": pb.COUNTER,
    "gauge": pb.GAUGE,
    "info": pb.GAUGE,
    "stateset": pb.GAUGE,
    "unknown": pb.UNTYPED,
    "untyped": pb.UNTYPED,
    "summary": pb.SUMMARY,
    "histogram": pb.HISTOGRAM,
    "gaugehistogram": pb.GAUGE_HISTOGRAM,
}
# the label that splits one series into several samples, per type
_SPLIT = {"summary": "quantile", "histogram": "le", "gaugehistogram": "le"}
Doc = dict[str, Any]


def generate(registry: Collector) -> bytes:
    """The delimited protobuf body for a scrape of ``registry``."""
    return pb.encode_delimited(family_of(metric) for metric in registry.collect())


def family_of(metric: Metric) -> Message:
    kind = metric.type
    name = metric.name
    if kind == "counter":
        name += "_total"
    elif kind == "info":
        name += "_info"
    split = _SPLIT.get(kind)
    series: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], list[Sample]]] = {}
    for s in metric.samples:
        labels = {k: v for k, v in s.labels.items() if k != split}
        key = tuple(sorted(labels.items()))
        entry = series.get(key)
        if entry is None:
            entry = series[key] = (labels, [])
        entry[1].append(s)
    metrics = []
    for labels, samples in series.values():
        doc: Doc = {"label": [{"name": k, "value": v} for k, v in labels.items()]}
        if kind == "summary":
            doc["summary"] = _summary(metric.name, samples)
        elif kind in ("histogram", "gaugehistogram"):
            native = metric.native_of(labels) if isinstance(metric, NativeHistogramFamily) else None
            doc["histogram"] = _histogram(metric.name, samples, native)
        elif kind == "counter":
            doc["counter"] = _counter(metric.name, samples)
        else:
            # gauge, info, stateset, untyped: one sample per series (a stateset has
            # one per state, told apart by the state label, so grouped separately)
            field = "untyped" if _TYPES.get(kind) == pb.UNTYPED else "gauge"
            doc[field] = {"value": samples[0].value}
        timestamp = next((s.timestamp for s in samples if s.timestamp is not None), None)
        if timestamp is not None:
            doc["timestamp_ms"] = int(float(timestamp) * 1000)
        metrics.append(doc)
    family: Doc = {
        "name": name,
        "help": metric.documentation,
        "type": _TYPES.get(kind, pb.UNTYPED),
        "metric": metrics,
    }
    if metric.unit:
        family["unit"] = metric.unit
    return pb.MetricFamily(**family)


def _counter(name: str, samples: list[Sample]) -> Doc:
    doc: Doc = {}
    for s in samples:
        if s.name == name + "_created":
            doc["created_timestamp"] = _timestamp(s.value)
        else:
            doc["value"] = s.value
            if s.exemplar is not None:
                doc["exemplar"] = _exemplar(s.exemplar)
    return doc


def _summary(name: str, samples: list[Sample]) -> Doc:
    doc: Doc = {"quantile": []}
    for s in samples:
        if s.name == name + "_count":
            doc["sample_count"] = int(s.value)
        elif s.name == name + "_sum":
            doc["sample_sum"] = s.value
        elif s.name == name + "_created":
            doc["created_timestamp"] = _timestamp(s.value)
        else:
            doc["quantile"].append({"quantile": float(s.labels["quantile"]), "value": s.value})
    return doc


def _histogram(name: str, samples: list[Sample], native: NativeBuckets | None) -> Doc:
    doc: Doc = {"bucket": []}
    exemplars = []
    for s in samples:
        suffix = s.name[len(name) :]
        if suffix == "_bucket":
            bucket: Doc = {"upper_bound": float(s.labels["le"]), **_count("cumulative_count", s)}
            if s.exemplar is not None:
                bucket["exemplar"] = _exemplar(s.exemplar)
                if s.exemplar.timestamp is not None:
                    exemplars.append(bucket["exemplar"])
            doc["bucket"].append(bucket)
        elif suffix in ("_count", "_gcount"):
            doc.update(_count("sample_count", s))
        elif suffix in ("_sum", "_gsum"):
            doc["sample_sum"] = s.value
        elif suffix == "_created":
            doc["created_timestamp"] = _timestamp(s.value)
    if native is not None:
        doc["schema"] = native.schema
        doc["zero_threshold"] = native.zero_threshold
        doc["zero_count"] = native.zero_count
        # a no-op span marks a histogram without observations as native
        doc["positive_span"] = _span_docs(native.positive_spans) or [{"offset": 0, "length": 0}]
        doc["positive_delta"] = native.positive_deltas
        doc["negative_span"] = _span_docs(native.negative_spans)
        doc["negative_delta"] = native.negative_deltas
        doc["exemplars"] = exemplars  # native exemplars must carry a timestamp
    return doc


def _count(field: str, s: Sample) -> Doc:
    value = s.value
    if value >= 0 and math.isfinite(value) and value == int(value):
        return {field: int(value)}
    return {f"{field}_float": value}


def _span_docs(spans: list[tuple[int, int]]) -> list[Doc]:
    return [{"offset": offset, "length": length} for offset, length in spans]


def _exemplar(ex: Exemplar) -> Doc:
    doc: Doc = {
        "label": [{"name": k, "value": v} for k, v in ex.labels.items()],
        "value": ex.value,
    }
    if ex.timestamp is not None:
        doc["timestamp"] = _timestamp(float(ex.timestamp))
    return doc


def _timestamp(seconds: float) -> Mapping[str, int]:
    whole = math.floor(seconds)
    return {"seconds": whole, "nanos": min(999_999_999, round((seconds - whole) * 1e9))}
