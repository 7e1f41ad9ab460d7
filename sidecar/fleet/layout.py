"""Time layout of the fleet window, shared by writers and readers.

Every window of ``SIDECAR_WINDOWS_S`` is cut into slots of ``max(1, window // 60)``
seconds of wall-clock time, as the local engine cuts it (`window.RollingHistogram`):
slot ``k`` holds what the fleet observed in ``[k * slot_s, (k + 1) * slot_s)``. A
reader takes slot ``k`` once it is settled: ``SETTLE_S`` seconds after it ended, so
that every sidecar has flushed it. That is the clock skew the view tolerates: a
sidecar whose clock runs up to ``SETTLE_S - 1 s`` behind the reader's still lands in
time (a clock that runs ahead only lands early, which is harmless). A write that
lands later anyway (a sidecar or Redis was slow, a clock is further off) is marked
late, by Redis's own clock, and readers read that slot again.
"""

from __future__ import annotations

import math

SLOTS_PER_WINDOW = 60
SETTLE_S = 2.5
LEASE_TTL_S = 3.0  # the evaluator's lease; renewed every second


def slot_seconds(window_s: int) -> int:
    return max(1, window_s // SLOTS_PER_WINDOW)


def slots_in(window_s: int) -> int:
    return max(1, window_s // slot_seconds(window_s))


def slot_of(t: float, window_s: int) -> int:
    """The slot of window ``window_s`` that wall time ``t`` falls in."""
    return math.floor(t / slot_seconds(window_s))


def settled_slot(now: float, window_s: int) -> int:
    """The newest slot every sidecar has flushed by wall time ``now``."""
    return math.floor((now - SETTLE_S) / slot_seconds(window_s)) - 1


def late_after(slot: int, window_s: int) -> float:
    """A write to the slot applied after this (by Redis's clock) is late: a reader may
    have read the slot already (one second of margin for clocks and latency)."""
    return (slot + 1) * slot_seconds(window_s) + SETTLE_S - 1.0


def expires_at(slot: int, window_s: int) -> float:
    """When a slot's data can go: once no window can contain it any more."""
    return (slot + 1) * slot_seconds(window_s) + window_s + SETTLE_S + 5.0
