"""The demo's live terminal table: per route and for streams, from the sidecar itself."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from ..breach import BreachDetector
from ..percentiles import Snapshot
from ..record import UPSTREAM_ERRORS, TimingRecord
from ..routes import ALL


class ErrorCounter:
    """Observer: 5xx and upstream failures per (route, stream), for the table."""

    def __init__(self) -> None:
        self.errors: Counter[tuple[str, bool]] = Counter()

    def observe(self, record: TimingRecord) -> None:
        if record.status >= 500 or record.error in UPSTREAM_ERRORS:
            self.errors[(record.route, record.stream)] += 1
            self.errors[(ALL, record.stream)] += 1


def breach_names(detector: BreachDetector) -> list[str]:
    """Active breaches, one short line each, for the table's footer."""
    return [
        f"{a['route']} {'stream ' if a['stream'] else ''}{a['quantile']}={a['value_ms']}ms"
        f" ({a['severity']})"
        for a in detector.active_json()
    ]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:8.1f}"


def render(
    snap: Snapshot, errors: ErrorCounter, elapsed_s: float, breaches: Iterable[str] = ()
) -> str:
    window = snap.windows_s[0]
    span = max(1.0, min(float(window), elapsed_s))
    head = (
        f"{'route':<28} {'kind':<6} {'count':>7} {'rps':>6} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    lines = [
        f"last {window}s window (latency: unary = total, stream = time to first byte)",
        head,
        "-" * len(head),
    ]
    rows = sorted(snap.stats.items(), key=lambda kv: (kv[0][1], kv[0][0] == ALL, kv[0][0]))
    for (route, stream), per_window in rows:
        s = per_window[window]
        lines.append(
            f"{route[:28]:<28} {'stream' if stream else 'unary':<6} {s.count:>7} "
            f"{s.count / span:>6.1f} {_ms(s.value(0.5))} {_ms(s.value(0.95))} "
            f"{_ms(s.value(0.99))} {errors.errors[(route, stream)]:>6}"
        )
    active = list(breaches)
    lines.append("")
    lines.append("active breaches: " + (", ".join(active) if active else "none"))
    return "\n".join(lines)
