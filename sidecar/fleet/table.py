"""`latency-sidecar fleet`: the fleet table in the terminal (the demo table's shape,
with a ``pods`` column: how many sidecars had requests for the row in the window)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from typing import TextIO

from ..config import Settings
from ..ids import new_id
from ..routes import ALL
from ..signals import StopSignals
from .store import FleetError, RedisFleetStore
from .view import FleetView

CLEAR = "\x1b[H\x1b[2J"
SHOW_NAMES = 6


def _ms(seconds: float) -> str:
    return f"{'-':>8}" if math.isnan(seconds) else f"{seconds * 1000:8.1f}"


def _clean(text: str, width: int) -> str:
    """Route labels come from other sidecars: printable characters only."""
    return "".join(c if c.isprintable() else "?" for c in text)[:width]


def render(view: FleetView) -> str:
    snap = view.snapshot()
    window = snap.windows_s[0]
    names = ", ".join(_clean(n, 40) for n in view.instances[:SHOW_NAMES])
    if len(view.instances) > SHOW_NAMES:
        names += f", ... ({len(view.instances) - SHOW_NAMES} more)"
    stale = view.stale_s
    head = (
        f"{'route':<28} {'kind':<6} {'count':>7} {'rps':>6} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'pods':>5}"
    )
    lines = [
        f"fleet {view.fleet}: {len(view.instances)} instances ({names})",
        f"last {window}s window, read {stale or 0:.1f}s ago "
        "(latency: unary = total, stream = time to first byte)",
        head,
        "-" * len(head),
    ]
    rows = sorted(snap.stats.items(), key=lambda kv: (kv[0][1], kv[0][0] == ALL, kv[0][0]))
    for key, per_window in rows:
        route, stream = key
        s = per_window[window]
        if not s.count:
            continue
        lines.append(
            f"{_clean(route, 28):<28} {'stream' if stream else 'unary':<6} {s.count:>7} "
            f"{s.count / window:>6.1f} {_ms(s.value(0.5))} {_ms(s.value(0.95))} "
            f"{_ms(s.value(0.99))} {view.pods.get(key, 0):>5}"
        )
    return "\n".join(lines)


async def show_fleet(settings: Settings, *, watch: bool, interval_s: float = 2.0,
                     out: TextIO = sys.stdout) -> int:  # fmt: skip
    """Print the fleet table once, or (``watch``) every ``interval_s`` until Ctrl-C."""
    store = RedisFleetStore(
        settings.redis_url, settings.fleet, "cli", f"cli/{new_id()[:8]}", settings.windows_s
    )
    try:
        try:
            windows = await store.windows() or list(settings.windows_s)
        except FleetError as exc:  # Redis unreachable: one line, exit 2 (cli.cmd_fleet)
            raise OSError(str(exc)) from None
        view = FleetView(store, settings.fleet, windows)
        async with StopSignals() as stop:
            while True:
                try:
                    await view.refresh()
                except FleetError as exc:
                    if not watch:
                        raise OSError(str(exc)) from None
                if view.read_at is not None and not view.instances:
                    text = (
                        f"no sidecar shares fleet {settings.fleet} "
                        f"(none in the last {windows[0]} s)"
                    )
                else:
                    text = render(view)
                prefix = CLEAR if watch and out.isatty() else ""
                print(prefix + text + ("\n" if watch else ""), file=out, flush=True)
                if not watch or stop.stopping:
                    return 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
                if stop.stopping:
                    return 0
    finally:
        await store.aclose()
