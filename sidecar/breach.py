"""Breach detection: rules over the shortest rolling window, one event per state change.

Each (route, stream, rule) has its own state. The rules: p95 -> warning and p99 ->
critical over request latency (metric ``latency``), and, when configured, p95 ->
warning over time to first token (``ttft``) and time per output token (``tpot``).
A breach starts when the percentile is above its threshold with at least
`min_samples` requests in the window. It resolves when the percentile falls to or
below ``threshold * (1 - HYSTERESIS)`` with enough samples, or when the window is
empty (no traffic, no latency problem). Between the two lines the state holds, so a
value hovering at the threshold does not flap.

Every breach and resolved event carries the anatomy of its window and route: upstream
and overhead p95, the worst event-loop lag, and the `anatomy.cause.cause_of` verdict
(a resolved event keeps the cause of the breach it ends).

`SlowRequests` is the hot-path observer for single slow requests, rate limited so a
slow upstream cannot flood the sinks. The client's `X-Request-Id` enters its event
here, so it is made printable and cut to `REQUEST_ID_MAX` characters (the route is a
label, already bounded and printable; the trace id is validated hex).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .anatomy.cause import cause_of
from .anatomy.observer import Anatomy
from .events import BREACH, LATENCY, RESOLVED, SLOW_REQUEST, Event, EventBus
from .metrics import Metrics
from .percentiles import Percentiles, Snapshot, WindowStats
from .printable import REQUEST_ID_MAX, untrusted
from .record import CLIENT_DISCONNECT, TimingRecord
from .routes import ALL
from .runtime.looplag import LoopLag
from .timefmt import iso_ms

log = logging.getLogger(__name__)
HYSTERESIS = 0.10


@dataclass(frozen=True, slots=True)
class Rule:
    quantile: float
    name: str  # "p95"
    severity: str
    threshold_ms: float
    metric: str = LATENCY


def latency_rules(p95_threshold_ms: float, p99_threshold_ms: float) -> tuple[Rule, Rule]:
    """The SPEC's two rules: p95 -> warning, p99 -> critical (instance and fleet alike)."""
    return (
        Rule(0.95, "p95", "warning", p95_threshold_ms),
        Rule(0.99, "p99", "critical", p99_threshold_ms),
    )


def rule_event(
    kind: str, rule: Rule, route: str, stream: bool, window_s: int, value_ms: float,
    samples: int, instance: str, **fields: Any,
) -> Event:  # fmt: skip
    """A `breach` or `resolved` event of ``rule`` (instance and fleet alike); ``fields``:
    the rest of `Event`'s optional fields."""
    return Event(
        type=kind,
        severity=rule.severity,
        route=route,
        stream=stream,
        quantile=rule.name,
        window_s=window_s,
        value_ms=value_ms,
        threshold_ms=rule.threshold_ms,
        samples=samples,
        instance=instance,
        ts=time.time(),
        metric=rule.metric,
        **fields,
    )


def _ms(stats: WindowStats | None, q: float) -> float | None:
    return None if stats is None else stats.value(q) * 1000


@dataclass(frozen=True, slots=True)
class BreachPolicy:
    """What the instance detector judges by (from `SIDECAR_*` thresholds and windows)."""

    instance: str
    window_s: int  # the window the rules read (the shortest)
    min_samples: int
    eval_interval_s: float
    p95_threshold_ms: float
    p99_threshold_ms: float
    ttft_p95_threshold_ms: float | None = None  # None: rule off
    tpot_p95_threshold_ms: float | None = None


@dataclass(slots=True)
class Active:
    event: Event  # the breach event that started it
    value_ms: float
    samples: int

    def as_json(self) -> dict[str, Any]:
        e = self.event
        return {
            "route": e.route,
            "stream": e.stream,
            "quantile": e.quantile,
            "severity": e.severity,
            "metric": e.metric,
            "cause": e.cause,
            "since": iso_ms(e.ts),
            "value_ms": round(self.value_ms, 1),
            "threshold_ms": e.threshold_ms,
            "window_s": e.window_s,
            "samples": self.samples,
        }


class BreachDetector:
    def __init__(
        self, policy: BreachPolicy, percentiles: Percentiles, bus: EventBus, metrics: Metrics,
        anatomy: Anatomy | None = None, lag: LoopLag | None = None,
    ) -> None:  # fmt: skip
        self._p = percentiles
        self._bus = bus
        self._metrics = metrics
        self._window = policy.window_s
        self._min = policy.min_samples
        self._interval = policy.eval_interval_s
        self._instance = policy.instance
        self.rules = latency_rules(policy.p95_threshold_ms, policy.p99_threshold_ms)
        self._anatomy = anatomy
        self._lag = lag
        self.anatomy_rules: list[tuple[Percentiles, Rule]] = []
        if anatomy is not None:
            for windows, metric, threshold in (
                (anatomy.ttft, "ttft", policy.ttft_p95_threshold_ms),
                (anatomy.tpot, "tpot", policy.tpot_p95_threshold_ms),
            ):
                if threshold is not None:
                    rule = Rule(0.95, "p95", "warning", threshold, metric)
                    self.anatomy_rules.append((windows, rule))
        self.active: dict[tuple[str, bool, str, str], Active] = {}

    def evaluate(self) -> list[Event]:
        """Judge every route and `*` once; publish and return the state changes."""
        raised: list[Event] = []
        self._judge(self._p.snapshot(), self.rules, raised)
        for windows, rule in self.anatomy_rules:
            self._judge(windows.snapshot(), (rule,), raised)
        for event in raised:
            self._bus.publish(event)
        return raised

    def _judge(self, snap: Snapshot, rules: tuple[Rule, ...], raised: list[Event]) -> None:
        for (route, stream), per_window in snap.stats.items():
            stats = per_window[self._window]
            for rule in rules:
                key = (route, stream, rule.metric, rule.name)
                current = self.active.get(key)
                value_ms = stats.value(rule.quantile) * 1000 if stats.count else 0.0
                if current is None:
                    if stats.count >= self._min and value_ms > rule.threshold_ms:
                        event = self._event(BREACH, rule, route, stream, value_ms, stats.count)
                        self.active[key] = Active(event, value_ms, stats.count)
                        self._gauge(event, 1)
                        raised.append(event)
                elif stats.count == 0 or (
                    stats.count >= self._min and value_ms <= rule.threshold_ms * (1 - HYSTERESIS)
                ):
                    del self.active[key]
                    event = self._event(
                        RESOLVED, rule, route, stream, value_ms, stats.count,
                        started_at=current.event.ts, cause=current.event.cause,
                    )  # fmt: skip
                    self._gauge(event, 0)
                    raised.append(event)
                else:
                    current.value_ms, current.samples = value_ms, stats.count

    def _stats(self, windows: Percentiles, route: str, stream: bool) -> WindowStats | None:
        if route == ALL:  # kept per route only (anatomy/observer.py): merged here
            stats: WindowStats | None = windows.merged(stream, self._window)
        else:
            per_window = windows.snapshot().stats.get((route, stream))
            stats = per_window.get(self._window) if per_window else None
        return stats if stats is not None and stats.count else None

    def _event(
        self, kind: str, rule: Rule, route: str, stream: bool, value_ms: float, samples: int,
        started_at: float | None = None, cause: str | None = None,
    ) -> Event:  # fmt: skip
        upstream = overhead = None
        if self._anatomy is not None:
            upstream = self._stats(self._anatomy.upstream, route, stream)
            overhead = self._stats(self._anatomy.overhead, route, stream)
        upstream_ms, overhead_ms = _ms(upstream, 0.95), _ms(overhead, 0.95)
        lag_ms = None if self._lag is None else self._lag.max_over(self._window) * 1000
        if cause is None:
            # judged at the rule's own quantile: a p99 breach against the upstream's
            # p99 (its p95 can be far below a p99 that a few slow answers make)
            q = rule.quantile
            cause = cause_of(rule.metric, value_ms, _ms(upstream, q) or 0.0,
                             _ms(overhead, q) or 0.0, lag_ms or 0.0)  # fmt: skip
        return rule_event(
            kind, rule, route, stream, self._window, value_ms, samples, self._instance,
            started_at=started_at, upstream_p95_ms=upstream_ms, overhead_p95_ms=overhead_ms,
            loop_lag_max_ms=lag_ms, cause=cause,
        )  # fmt: skip

    def _gauge(self, event: Event, value: int) -> None:
        self._metrics.breach_active.labels(
            event.route, "true" if event.stream else "false", event.quantile, event.severity,
            event.metric,
        ).set(value)  # fmt: skip

    def active_json(self) -> list[dict[str, Any]]:
        return [a.as_json() for a in self.active.values()]


class SlowRequests:
    """Observer: one `slow_request` event per request slower than the threshold
    (streams: time to first byte), at most `max_per_s` per second."""

    def __init__(self, threshold_ms: float, instance: str, bus: EventBus, metrics: Metrics,
                 max_per_s: float = 20.0) -> None:  # fmt: skip
        self._threshold_s = threshold_ms / 1000
        self._threshold_ms = threshold_ms
        self._instance = instance
        self._bus = bus
        self._suppressed = metrics.events_suppressed.labels(SLOW_REQUEST)
        self._rate = max_per_s
        self._tokens = max_per_s
        self._last = time.monotonic()

    def observe(self, record: TimingRecord) -> None:
        latency = record.latency
        if latency <= self._threshold_s or record.error == CLIENT_DISCONNECT:
            return
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self._suppressed.inc()
            return
        self._tokens -= 1
        self._bus.publish(
            Event(
                type=SLOW_REQUEST,
                severity="info",
                route=record.route,
                stream=record.stream,
                quantile="",
                window_s=None,
                value_ms=latency * 1000,
                threshold_ms=self._threshold_ms,
                samples=None,
                instance=self._instance,
                ts=record.wall + latency,
                request_id=untrusted(record.request_id, REQUEST_ID_MAX),
                trace_id=record.trace_id or "",
            )
        )
