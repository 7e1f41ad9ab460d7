"""Fleet breach rules: the instance rules (`breach.BreachDetector`) judged on the fleet
window, by the lease holder only, with their state in the store.

Exactly one event per fleet state change:

* only the lease holder evaluates, and every change is a compare-and-set on the
  rule's version in the store, fenced by the holder's lease token: a sidecar that lost
  the lease (expired, partitioned) cannot change anything;
* the change and its event are written together (one script), into an outbox next to
  the state; the holder then copies the outbox to the stream, skipping any event whose
  id the stream already holds;
* event ids are deterministic (fleet, rule, version): a copy repeated after a crash
  between "added to the stream" and "removed from the outbox" is recognised.

A new holder reads the state from the store, so an open breach is neither raised
again nor forgotten: its resolve comes from whoever holds the lease when the fleet
recovers.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

from ..breach import HYSTERESIS, Active, BreachPolicy, Rule, latency_rules, rule_event
from ..events import BREACH, FLEET_SCOPE, RESOLVED, Event, EventBus
from ..percentiles import EMPTY, Key
from .store import FleetStore, Lease, RuleState, event_of, key_of, member_of
from .view import FleetView

log = logging.getLogger(__name__)
_NAMESPACE = uuid.UUID("8f0f6d1e-5d8a-4b7e-9f39-3b1c2b7a6c11")


def rule_id(key: Key, rule: Rule) -> str:
    return f"{rule.name} {member_of(key)}"


class FleetBreaches:
    def __init__(
        self, policy: BreachPolicy, fleet: str, stream: str, maxlen: int,
        store: FleetStore, view: FleetView, bus: EventBus,
    ) -> None:  # fmt: skip
        """``policy``: the instance detector's (window, minimum samples, thresholds);
        ``stream`` and ``maxlen``: the Redis Stream the events go to, and its cap."""
        self._store = store
        self._view = view
        self._bus = bus
        self._fleet = fleet
        self._instance = policy.instance
        self._window = policy.window_s
        self._min = policy.min_samples
        self._stream = stream
        self._maxlen = maxlen
        self.rules = latency_rules(policy.p95_threshold_ms, policy.p99_threshold_ms)

    async def evaluate(self, lease: Lease) -> list[Event]:
        """Judge the fleet window; apply the state changes; deliver queued events.
        Returns the events delivered to the stream by this call."""
        states = await self._store.rule_states()
        snap = self._view.snapshot()
        instances = len(self._view.instances)
        keys = set(snap.stats)
        for rid, state in states.items():
            if state.active is not None:
                key = key_of(rid.partition(" ")[2])
                if key is not None:
                    keys.add(key)
        for key in sorted(keys):
            stats = snap.stats.get(key, {}).get(self._window, EMPTY)
            for rule in self.rules:
                rid = rule_id(key, rule)
                current = states.get(rid)
                gen, active = (current.gen, current.active) if current else (0, None)
                value_ms = stats.value(rule.quantile) * 1000 if stats.count else 0.0
                if active is None:
                    if stats.count >= self._min and value_ms > rule.threshold_ms:
                        event = self._event(
                            BREACH, rule, key, value_ms, stats.count, instances, rid, gen
                        )
                        await self._apply(lease, rid, gen, event, _kwargs(event))
                elif stats.count == 0 or (
                    stats.count >= self._min and value_ms <= rule.threshold_ms * (1 - HYSTERESIS)
                ):
                    event = self._event(
                        RESOLVED,
                        rule,
                        key,
                        value_ms,
                        stats.count,
                        instances,
                        rid,
                        gen,
                        started_at=float(active.get("ts", 0.0)),
                    )
                    await self._apply(lease, rid, gen, event, None)
        delivered = await self._store.deliver_outbox(lease, self._stream, self._maxlen)
        events = []
        for doc in delivered:
            event = event_of(doc["event"])
            # the stream has it already; the other sinks (webhooks, Alertmanager) get it here
            self._bus.publish(event, skip=("redis",))
            events.append(event)
        return events

    async def _apply(
        self, lease: Lease, rid: str, gen: int, event: Event, active: dict[str, Any] | None
    ) -> None:
        doc = {"fields": event.fields(), "event": _kwargs(event)}
        if not await self._store.transition(lease, rid, gen, active, doc):
            log.info("fleet rule %s changed elsewhere; not raising %s", rid, event.type)

    def _event(
        self,
        kind: str,
        rule: Rule,
        key: Key,
        value_ms: float,
        samples: int,
        instances: int,
        rid: str,
        gen: int,
        started_at: float | None = None,
    ) -> Event:
        route, stream = key
        return rule_event(
            kind, rule, route, stream, self._window, value_ms, samples, self._instance,
            # one id per (fleet, rule, version): whoever writes it, it is the same event
            event_id=str(uuid.uuid5(_NAMESPACE, f"{self._fleet}\n{rid}\n{gen + 1}")),
            started_at=started_at, scope=FLEET_SCOPE, fleet=self._fleet, instances=instances,
            # pods share latency histograms, not the anatomy's upstream/overhead windows:
            # who caused it is told by each pod's own (instance) events
            cause="unknown",
        )  # fmt: skip


def _kwargs(event: Event) -> dict[str, Any]:
    return dataclasses.asdict(event)


def active_json(states: dict[str, RuleState]) -> list[dict[str, Any]]:
    """The fleet's open breaches, shaped like `/breaches` ``active`` entries (the value
    and samples are the breach event's, when it was raised), plus ``fleet`` and
    ``instances``; ordered by route, then rule."""
    out = []
    for _, state in sorted(states.items()):
        if state.active is None:
            continue
        event = event_of(state.active)
        doc = Active(event, event.value_ms, event.samples or 0).as_json()
        doc.update(fleet=event.fleet, instances=event.instances)
        out.append(doc)
    return out
