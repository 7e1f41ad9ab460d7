"""Who made a breach: the upstream, the sidecar itself, or neither clearly.

The rule (README "Latency anatomy"), over the breach's window and route, with V the
breaching value and the times below at the rule's quantile (breach.py):

1. ``sidecar`` when the sidecar's own time (its overhead) or the worst event-loop lag
   is at least `SIDECAR_SHARE` of V: a healthy sidecar adds well under a millisecond
   and its loop lags a few, so either being a fifth of a breaching value means the
   sidecar is part of the problem (a stalled loop also delays reading the upstream's
   answer, which then looks like upstream time: only the lag tells). For ``tpot``
   (milliseconds per token, averaged over a stream) when the loop was saturated: lag
   above `SATURATED_S`;
2. ``upstream`` when the upstream's own time (time to its response headers,
   for streams to the first token) is at least `UPSTREAM_SHARE` of V; for ``tpot``
   otherwise always (tokens are paced by the upstream and timed as they arrive);
3. ``unknown`` otherwise (e.g. slow client uploads, or too few samples to tell).
"""

from __future__ import annotations

SATURATED_S = 0.1
SIDECAR_SHARE = 0.2
UPSTREAM_SHARE = 0.8

UPSTREAM, SIDECAR, UNKNOWN = "upstream", "sidecar", "unknown"


def cause_of(
    metric: str, value_ms: float, upstream_ms: float, overhead_ms: float, loop_lag_ms: float
) -> str:
    if metric == "tpot":
        if loop_lag_ms > SATURATED_S * 1000:
            return SIDECAR
        return UPSTREAM if value_ms > 0 else UNKNOWN
    if value_ms <= 0:
        return UNKNOWN
    share = SIDECAR_SHARE * value_ms
    if overhead_ms >= share or loop_lag_ms >= share:
        return SIDECAR
    if upstream_ms >= UPSTREAM_SHARE * value_ms:
        return UPSTREAM
    return UNKNOWN
