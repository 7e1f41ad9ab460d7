"""The `io.prometheus.client` protobuf messages, and their length-delimited stream.

The message definitions are Prometheus' published `metrics.proto` (client_model,
proto2; field numbers as published, native-histogram fields included), written here as
a `FileDescriptorProto` and built into a private descriptor pool at import time: no
protoc, no generated file to keep in sync. Repeated numbers are marked packed (every
protobuf parser accepts both encodings; packed is smaller).

A scrape body is a stream of `MetricFamily` messages, each prefixed with its size as a
varint; `protobuf`'s own `proto.serialize_length_prefixed` / `parse_length_prefixed`
write and read that framing.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, proto
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.message import Message

CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)
PACKAGE = "io.prometheus.client"

# MetricType enum values
COUNTER, GAUGE, SUMMARY, UNTYPED, HISTOGRAM, GAUGE_HISTOGRAM = range(6)

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {
    "string": _F.TYPE_STRING,
    "double": _F.TYPE_DOUBLE,
    "uint64": _F.TYPE_UINT64,
    "uint32": _F.TYPE_UINT32,
    "int64": _F.TYPE_INT64,
    "sint32": _F.TYPE_SINT32,
    "sint64": _F.TYPE_SINT64,
}
_TIMESTAMP = ".google.protobuf.Timestamp"

# message -> [(field, number, type, repeated)]; a type not in _SCALARS is a message
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "LabelPair": [("name", 1, "string", False), ("value", 2, "string", False)],
    "Gauge": [("value", 1, "double", False)],
    "Counter": [
        ("value", 1, "double", False),
        ("exemplar", 2, "Exemplar", False),
        ("created_timestamp", 3, _TIMESTAMP, False),
    ],
    "Quantile": [("quantile", 1, "double", False), ("value", 2, "double", False)],
    "Summary": [
        ("sample_count", 1, "uint64", False),
        ("sample_sum", 2, "double", False),
        ("quantile", 3, "Quantile", True),
        ("created_timestamp", 4, _TIMESTAMP, False),
    ],
    "Untyped": [("value", 1, "double", False)],
    "Histogram": [
        ("sample_count", 1, "uint64", False),
        ("sample_count_float", 4, "double", False),
        ("sample_sum", 2, "double", False),
        ("bucket", 3, "Bucket", True),
        ("created_timestamp", 15, _TIMESTAMP, False),
        ("schema", 5, "sint32", False),
        ("zero_threshold", 6, "double", False),
        ("zero_count", 7, "uint64", False),
        ("zero_count_float", 8, "double", False),
        ("negative_span", 9, "BucketSpan", True),
        ("negative_delta", 10, "sint64", True),
        ("negative_count", 11, "double", True),
        ("positive_span", 12, "BucketSpan", True),
        ("positive_delta", 13, "sint64", True),
        ("positive_count", 14, "double", True),
        ("exemplars", 16, "Exemplar", True),
    ],
    "Bucket": [
        ("cumulative_count", 1, "uint64", False),
        ("cumulative_count_float", 4, "double", False),
        ("upper_bound", 2, "double", False),
        ("exemplar", 3, "Exemplar", False),
    ],
    "BucketSpan": [("offset", 1, "sint32", False), ("length", 2, "uint32", False)],
    "Exemplar": [
        ("label", 1, "LabelPair", True),
        ("value", 2, "double", False),
        ("timestamp", 3, _TIMESTAMP, False),
    ],
    "Metric": [
        ("label", 1, "LabelPair", True),
        ("gauge", 2, "Gauge", False),
        ("counter", 3, "Counter", False),
        ("summary", 4, "Summary", False),
        ("untyped", 5, "Untyped", False),
        ("histogram", 7, "Histogram", False),
        ("timestamp_ms", 6, "int64", False),
    ],
    "MetricFamily": [
        ("name", 1, "string", False),
        ("help", 2, "string", False),
        ("type", 3, ".io.prometheus.client.MetricType", False),
        ("metric", 4, "Metric", True),
        ("unit", 5, "string", False),
    ],
}
_ENUM = ("MetricType", ["COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM"])


def _file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="io/prometheus/client/metrics.proto",
        package=PACKAGE,
        syntax="proto2",
        dependency=["google/protobuf/timestamp.proto"],
    )
    enum = fdp.enum_type.add(name=_ENUM[0])
    for number, name in enumerate(_ENUM[1]):
        enum.value.add(name=name, number=number)
    for message, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=message)
        for name, number, type_name, repeated in fields:
            field = msg.field.add(name=name, number=number, label=_REP if repeated else _OPT)
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
                if repeated:
                    field.options.packed = True
            elif type_name.endswith("MetricType"):
                field.type, field.type_name = _F.TYPE_ENUM, type_name
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = type_name if type_name[0] == "." else f".{PACKAGE}.{type_name}"
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_timestamp_pb2.DESCRIPTOR.serialized_pb)
_POOL.AddSerializedFile(_file().SerializeToString())


def message_class(name: str) -> type[Message]:
    """The message class of ``io.prometheus.client.<name>``."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


MetricFamily = message_class("MetricFamily")


def encode_delimited(families: Iterable[Message]) -> bytes:
    out = io.BytesIO()
    for family in families:
        proto.serialize_length_prefixed(family, out)
    return out.getvalue()


def decode_delimited(body: bytes) -> list[Any]:
    """Every `MetricFamily` in a delimited stream (for tests and tools)."""
    stream = io.BytesIO(body)
    families = []
    while (family := proto.parse_length_prefixed(MetricFamily, stream)) is not None:
        families.append(family)
    return families
