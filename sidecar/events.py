"""Events (SPEC "Events") and the bus that fans them out to sinks.

`EventBus.publish` is synchronous and O(sinks): it counts, logs (through the queued
log handler), remembers the event for `/breaches`, and appends it to each sink's
bounded queue. Delivery happens in each sink's background task.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from .ids import new_id
from .timefmt import iso_ms

log = logging.getLogger("sidecar.events")

BREACH, RESOLVED, SLOW_REQUEST = "breach", "resolved", "slow_request"
FIELDS = (
    "event_id", "type", "severity", "route", "stream", "quantile", "window_s",
    "value_ms", "threshold_ms", "samples", "instance", "ts", "request_id", "trace_id",
    # latency anatomy: breach and resolved events only
    "metric", "upstream_p95_ms", "overhead_p95_ms", "loop_lag_max_ms", "cause",
    # every event: instance or fleet scope
    "scope", "fleet", "instances",
)  # fmt: skip
INSTANCE_SCOPE, FLEET_SCOPE = "instance", "fleet"
LATENCY = "latency"  # the metric of the p95/p99 rules; anatomy adds "ttft" and "tpot"


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    severity: str
    route: str
    stream: bool
    quantile: str  # "p95", "p99", "" for slow_request
    window_s: int | None
    value_ms: float
    threshold_ms: float
    samples: int | None
    instance: str
    ts: float  # wall clock
    request_id: str = ""
    trace_id: str = ""
    event_id: str = field(default_factory=new_id)
    started_at: float | None = None  # resolved: when its breach started (not a field)
    metric: str = LATENCY
    upstream_p95_ms: float | None = None
    overhead_p95_ms: float | None = None
    loop_lag_max_ms: float | None = None
    cause: str = ""
    scope: str = INSTANCE_SCOPE  # "fleet": judged on the fleet window (SIDECAR_BREACH_SCOPE)
    fleet: str = ""  # fleet events: the fleet's name
    instances: int | None = None  # fleet events: how many sidecars contributed

    def fields(self) -> dict[str, str]:
        """The Redis Stream entry: SPEC field names, all values strings, SPEC order."""
        out = {
            "event_id": self.event_id,
            "type": self.type,
            "severity": self.severity,
            "route": self.route,
            "stream": "true" if self.stream else "false",
            "quantile": self.quantile,
            "window_s": "" if self.window_s is None else str(self.window_s),
            "value_ms": f"{self.value_ms:.1f}",
            "threshold_ms": f"{self.threshold_ms:g}",
            "samples": "" if self.samples is None else str(self.samples),
            "instance": self.instance,
            "ts": iso_ms(self.ts),
        }
        if self.type == SLOW_REQUEST:
            out["request_id"] = self.request_id
            if self.trace_id:
                out["trace_id"] = self.trace_id
        else:
            out["metric"] = self.metric
            out["upstream_p95_ms"] = _ms(self.upstream_p95_ms)
            out["overhead_p95_ms"] = _ms(self.overhead_p95_ms, 3)
            out["loop_lag_max_ms"] = _ms(self.loop_lag_max_ms)
            out["cause"] = self.cause
        out["scope"] = self.scope
        out["fleet"] = self.fleet
        out["instances"] = "" if self.instances is None else str(self.instances)
        return out

    def as_json(self) -> dict[str, Any]:
        """JSON body of the `json` webhook format and of `/breaches`."""
        doc: dict[str, Any] = dict(self.fields())
        doc["stream"] = self.stream
        doc["value_ms"] = round(self.value_ms, 1)
        doc["threshold_ms"] = self.threshold_ms
        doc["window_s"] = self.window_s
        doc["samples"] = self.samples
        if self.type != SLOW_REQUEST:
            for key in ("upstream_p95_ms", "overhead_p95_ms", "loop_lag_max_ms"):
                doc[key] = None if doc[key] == "" else float(doc[key])
        doc["instances"] = self.instances
        return doc

    @property
    def rule_key(self) -> tuple[str, bool, str, str, str]:
        return (self.route, self.stream, self.quantile, self.severity, self.metric)


def _ms(value: float | None, digits: int = 1) -> str:
    """Empty when not measured (no sample in the window)."""
    return "" if value is None or value != value else f"{value:.{digits}f}"


class Sink(Protocol):
    """A delivery target. Entering it starts its delivery task (and opens its client);
    leaving it stops the task and closes the client. `flush` first, to deliver."""

    name: str
    label: str

    def enqueue(self, event: Event) -> None: ...

    async def flush(self, within_s: float) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...


_LEVEL = {
    (BREACH, "warning"): logging.WARNING,
    (BREACH, "critical"): logging.ERROR,
    (SLOW_REQUEST, "info"): logging.WARNING,
}


class EventBus:
    def __init__(self, counter: Counter, sinks: Sequence[Sink] = (), recent: int = 200) -> None:
        """``counter``: `sidecar_events_total` (labels ``type``, ``severity``)."""
        self._counter = counter
        self.sinks = list(sinks)
        self.recent: deque[Event] = deque(maxlen=recent)

    def publish(self, event: Event, *, skip: Container[str] = ()) -> None:
        """``skip``: names of sinks that already have the event (fleet events are
        written to the Redis Stream by the fleet component itself)."""
        self._counter.labels(event.type, event.severity).inc()
        self.recent.append(event)
        level = _LEVEL.get((event.type, event.severity), logging.INFO)
        log.log(level, "%s %s %s", event.type, event.severity, event.route,
                extra={"event": event.fields()})  # fmt: skip
        for sink in self.sinks:
            if sink.name not in skip:
                sink.enqueue(event)

    def recent_json(self) -> list[dict[str, Any]]:
        """The last events, newest first (`/breaches`)."""
        return [e.as_json() for e in reversed(self.recent)]

    async def flush(self, within_s: float) -> None:
        """Give every sink up to ``within_s`` seconds (together) to deliver its queue."""
        if self.sinks:
            await asyncio.gather(*(s.flush(within_s) for s in self.sinks))
