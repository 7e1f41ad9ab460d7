"""The demo's live terminal table: per route and for streams, from the sidecar itself."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from ..events import BREACH, LATENCY, RESOLVED, Event
from ..percentiles import Snapshot
from ..printable import printable
from ..reader import format_event
from ..record import UPSTREAM_ERRORS, TimingRecord
from ..routes import ALL


class ErrorCounter:
    """Observer: 5xx and upstream failures per (route, stream) over the last
    ``window_s`` seconds (one slot per second), like the table's other columns."""

    def __init__(self, window_s: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._slots: deque[tuple[int, Counter[tuple[str, bool]]]] = deque()

    def observe(self, record: TimingRecord) -> None:
        if record.status >= 500 or record.error in UPSTREAM_ERRORS:
            now = int(self._clock())
            if not self._slots or self._slots[-1][0] != now:
                self._expire(now)
                self._slots.append((now, Counter()))
            slot = self._slots[-1][1]
            slot[(record.route, record.stream)] += 1
            slot[(ALL, record.stream)] += 1

    def count(self, route: str, stream: bool) -> int:
        self._expire(int(self._clock()))
        return sum(slot[(route, stream)] for _, slot in self._slots)

    def _expire(self, now: int) -> None:
        while self._slots and self._slots[0][0] <= now - self.window_s:
            self._slots.popleft()


def breach_names(active: Iterable[dict[str, Any]]) -> list[str]:
    """Active breaches (`BreachDetector.active_json`), one short line each, for the
    table's footer."""
    return [
        f"{a['route']} {'stream ' if a['stream'] else ''}"
        f"{'' if a['metric'] == LATENCY else a['metric'] + '_'}{a['quantile']}={a['value_ms']}ms"
        f" ({a['severity']}, cause {a['cause']})"
        for a in active
    ]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:8.1f}"


def _p95_ms(snap: Snapshot | None, key: tuple[str, bool], window: int) -> str:
    per_window = None if snap is None else snap.stats.get(key)
    return f"{'-':>8}" if per_window is None else _ms(per_window[window].value(0.95))


def render(
    snap: Snapshot,
    errors: ErrorCounter,
    elapsed_s: float,
    breaches: Iterable[str] = (),
    events: Iterable[Event] = (),
    ttft: Snapshot | None = None,
    tpot: Snapshot | None = None,
) -> str:
    """The table; ``ttft`` and ``tpot`` (the anatomy's windows) fill the stream rows'
    last two columns: p95 of the time to the first token and per output token."""
    window = snap.windows_s[0]
    span = max(1.0, min(float(window), elapsed_s))
    head = (
        f"{'route':<28} {'kind':<6} {'count':>7} {'rps':>6} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'ttft p95':>8} {'tpot p95':>8}"
    )
    lines = [
        f"last {window}s window (latency: unary = total, stream = time to first byte; "
        "ttft/tpot: time to first token / per output token, ms)",
        head,
        "-" * len(head),
    ]
    rows = sorted(snap.stats.items(), key=lambda kv: (kv[0][1], kv[0][0] == ALL, kv[0][0]))
    for (route, stream), per_window in rows:
        s = per_window[window]
        tokens = (
            f" {_p95_ms(ttft, (route, True), window)} {_p95_ms(tpot, (route, True), window)}"
            if stream
            else ""
        )
        lines.append(
            f"{route[:28]:<28} {'stream' if stream else 'unary':<6} {s.count:>7} "
            f"{s.count / span:>6.1f} {_ms(s.value(0.5))} {_ms(s.value(0.95))} "
            f"{_ms(s.value(0.99))} {errors.count(route, stream):>6}{tokens}"
        )
    active = list(breaches)
    lines.append("")
    lines.append(f"active breaches: {len(active)}" if active else "active breaches: none")
    lines.extend("  " + name for name in active)
    changes = [e for e in events if e.type in (BREACH, RESOLVED)]
    if changes:
        lines.append("latest breach events (as `latency-sidecar events` prints them):")
        # fleet events' routes were read back from Redis: escaped like `events` does
        lines.extend("  " + printable(format_event(e.event_id, e.fields())) for e in changes[-8:])
    return "\n".join(lines)
