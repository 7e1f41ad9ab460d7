"""Events as Alertmanager alerts: the push API's shape and the webhook payload (v4).

A breach is the alert ``LatencyBreach`` with labels route, stream, quantile, severity,
instance (a fleet breach: the fleet's name, plus ``scope="fleet"``; ``metric`` for the
ttft/tpot rules) and annotations value_ms, threshold_ms, window_s, samples,
upstream_p95_ms, overhead_p95_ms, loop_lag_max_ms, cause. A slow request is a
point-in-time ``SlowRequest`` alert (already resolved: startsAt = endsAt).
"""

from __future__ import annotations

import hashlib
from typing import Any

from .events import BREACH, FLEET_SCOPE, LATENCY, RESOLVED, Event
from .timefmt import iso_ms

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended"


def labels_of(event: Event) -> dict[str, str]:
    labels = {
        "alertname": "LatencyBreach" if event.type in (BREACH, RESOLVED) else "SlowRequest",
        "route": event.route,
        "stream": "true" if event.stream else "false",
        "severity": event.severity,
        "instance": event.instance,
    }
    if event.quantile:
        labels["quantile"] = event.quantile
    if event.scope == FLEET_SCOPE:
        # the same labels whichever sidecar evaluated it, so a resolve raised after a
        # fail-over still ends the alert its breach started
        labels["instance"] = event.fleet
        labels["scope"] = FLEET_SCOPE
    if event.type in (BREACH, RESOLVED) and event.metric != LATENCY:
        labels["metric"] = event.metric  # a ttft/tpot rule is its own alert
    return labels


def annotations_of(event: Event) -> dict[str, str]:
    fields = event.fields()
    keys = ("value_ms", "threshold_ms", "window_s", "samples", "request_id", "trace_id",
            "upstream_p95_ms", "overhead_p95_ms", "loop_lag_max_ms", "cause")  # fmt: skip
    return {k: fields[k] for k in keys if fields.get(k)}


def push_alert(event: Event, *, ends_at: float | None = None) -> dict[str, Any]:
    """One element of `POST /api/v2/alerts`."""
    starts = event.started_at if event.type == RESOLVED and event.started_at else event.ts
    alert: dict[str, Any] = {
        "labels": labels_of(event),
        "annotations": annotations_of(event),
        "startsAt": iso_ms(starts),
    }
    if event.type == RESOLVED:
        alert["endsAt"] = iso_ms(event.ts)
    elif ends_at is not None:
        alert["endsAt"] = iso_ms(ends_at)
    return alert


def webhook_payload(event: Event) -> dict[str, Any]:
    """The body Alertmanager itself would POST to a webhook receiver (version 4)."""
    labels = labels_of(event)
    firing = event.type == BREACH
    starts = event.started_at if event.type == RESOLVED and event.started_at else event.ts
    alert = {
        "status": "firing" if firing else "resolved",
        "labels": labels,
        "annotations": annotations_of(event),
        "startsAt": iso_ms(starts),
        "endsAt": ZERO_TIME if firing else iso_ms(event.ts),
        "generatorURL": "",
        "fingerprint": hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16],
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{labels["alertname"]}"}}',
        "truncatedAlerts": 0,
        "status": alert["status"],
        "receiver": "latency-sidecar",
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": alert["annotations"],
        "externalURL": "",
        "alerts": [alert],
    }
