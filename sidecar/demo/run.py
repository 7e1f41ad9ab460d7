"""`latency-sidecar demo`: gateway + sidecar + traffic + live table, in one process.

The whole story within half a minute: the gateway's chat slows down x5 from 5 s to
15 s of every minute (`SCHEDULE`); the sidecar judges a 10 s window every second
(`DEMO_SETTINGS`), so breaches are raised within a few seconds of the slowdown and
resolved about 10 s after it ends (when the window no longer holds slow requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO

from ..config import load_settings
from ..server import Sidecar
from ..signals import StopSignals
from .gateway import Schedule, serve_gateway
from .table import ErrorCounter, breach_names, render
from .traffic import Traffic

CLEAR = "\x1b[H\x1b[2J"
SCHEDULE = Schedule(cycle_s=60, slow_from_s=5, slow_to_s=15, factor=5)
DEMO_SETTINGS: dict[str, Any] = {"windows_s": [10, 60], "eval_interval_s": 1.0}


async def run_demo(
    *,
    duration: float | None,
    rps: float,
    refresh_s: float = 2.0,
    out: TextIO = sys.stdout,
    **overrides: Any,
) -> int:
    gateway = await serve_gateway("127.0.0.1", 0, schedule=SCHEDULE)
    try:
        gw_port = gateway.addresses[0][1]
        settings = load_settings(
            upstream_url=f"http://127.0.0.1:{gw_port}", **{**DEMO_SETTINGS, **overrides}
        )
        sidecar = Sidecar(settings)
        errors = ErrorCounter(settings.windows_s[0])
        sidecar.proxy.add_observer(errors)
        async with StopSignals() as stop, sidecar:
            traffic = await _show(sidecar, gw_port, rps, refresh_s, duration, errors, stop, out)
    finally:
        await gateway.cleanup()
    print(f"demo finished: {traffic.sent} requests sent, {traffic.failed} failed", file=out)
    return 0


async def _show(
    sidecar: Sidecar,
    gw_port: int,
    rps: float,
    refresh_s: float,
    duration: float | None,
    errors: ErrorCounter,
    stop: StopSignals,
    out: TextIO,
) -> Traffic:
    """Print where everything listens, send traffic, refresh the table until stopped."""
    settings = sidecar.settings
    host = settings.listen.host if settings.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    admin_host = settings.admin_listen.host
    admin_host = admin_host if admin_host not in ("0.0.0.0", "::") else "127.0.0.1"
    admin = f"http://{admin_host}:{sidecar.admin_port}"
    print(
        f"demo gateway   http://127.0.0.1:{gw_port}\n"
        f"sidecar proxy  http://{host}:{sidecar.proxy_port}  (try: curl -s "
        f"http://{host}:{sidecar.proxy_port}/v1/models)\n"
        f"admin          {admin}/percentiles  {admin}/metrics  {admin}/breaches  "
        f"{admin}/stats\n"
        f"schedule       chat slows down x{SCHEDULE.factor:g} from {SCHEDULE.slow_from_s:g} s "
        f"to {SCHEDULE.slow_to_s:g} s of every minute: watch the breaches come and go\n",
        file=out,
        flush=True,
    )
    traffic = Traffic(f"http://{host}:{sidecar.proxy_port}", rps=rps)
    traffic_task = asyncio.create_task(traffic.run(), name="demo-traffic")
    loop = asyncio.get_running_loop()
    started = loop.time()
    tty = out.isatty()
    try:
        while not stop.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), refresh_s)
            elapsed = loop.time() - started
            table = render(
                sidecar.percentiles.snapshot(),
                errors,
                elapsed,
                breach_names(sidecar.detector.active_json()),
                sidecar.bus.recent,
                sidecar.anatomy.ttft.snapshot(),
                sidecar.anatomy.tpot.snapshot(),
            )
            print((CLEAR if tty else "") + table + "\n", file=out, flush=True)
            if duration is not None and elapsed >= duration:
                break
    finally:
        traffic_task.cancel()
        await asyncio.gather(traffic_task, return_exceptions=True)
    return traffic
