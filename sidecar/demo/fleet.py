"""`latency-sidecar demo --replicas N`: one demo gateway, N sidecars sharing a fleet
through Redis, traffic spread over them, and the fleet table beside the per-pod rows.

Redis: ``SIDECAR_REDIS_URL`` when set, else a ``redis-server`` from PATH on a Unix
socket in a temporary directory (stopped and removed at exit), else one line saying
what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TextIO

from ..config import load_settings
from ..fleet.table import render as render_fleet
from ..ids import new_id
from ..percentiles import Snapshot
from ..routes import ALL
from ..server import Sidecar
from ..signals import StopSignals
from .gateway import serve_gateway
from .traffic import Traffic

CLEAR = "\x1b[H\x1b[2J"
EXIT_NO_REDIS = 2


@contextlib.contextmanager
def local_redis() -> Iterator[str | None]:
    """A private redis-server on a Unix socket; None when none is installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-redis-") as tmp:
        path = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no",
             "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    break
                time.sleep(0.05)
            yield f"unix://{path}"
        finally:
            proc.terminate()
            proc.wait(10)


def _pods(snaps: list[tuple[str, Snapshot]]) -> str:
    window = snaps[0][1].windows_s[0]
    head = f"{'pod':<14} {'kind':<6} {'count':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [f"each pod alone, last {window}s window, all routes", head, "-" * len(head)]
    for name, snap in snaps:
        for stream in (False, True):
            s = snap.stats.get((ALL, stream), {}).get(window)
            if s is None or not s.count:
                continue
            lines.append(
                f"{name:<14} {'stream' if stream else 'unary':<6} {s.count:>7} "
                + " ".join(f"{s.value(q) * 1000:8.1f}" for q in (0.5, 0.95, 0.99))
            )
    return "\n".join(lines)


async def run_fleet_demo(
    *,
    replicas: int,
    duration: float | None,
    rps: float,
    refresh_s: float = 2.0,
    out: TextIO = sys.stdout,
) -> int:
    with contextlib.ExitStack() as resources:
        url = os.environ.get("SIDECAR_REDIS_URL") or resources.enter_context(local_redis())
        if not url:
            print(
                "the fleet demo needs Redis: set SIDECAR_REDIS_URL, or install redis-server "
                "(apt-get install redis-server)",
                file=sys.stderr,
            )
            return EXIT_NO_REDIS
        return await _run(url, replicas, duration, rps, refresh_s, out)


async def _run(
    url: str, replicas: int, duration: float | None, rps: float, refresh_s: float, out: TextIO
) -> int:
    gateway = await serve_gateway("127.0.0.1", 0)
    fleet = f"demo-{new_id()[:6]}"
    traffic: list[Traffic] = []
    sidecars = [
        Sidecar(
            load_settings(
                upstream_url=f"http://127.0.0.1:{gateway.addresses[0][1]}",
                listen="127.0.0.1:0",
                admin_listen="127.0.0.1:0",
                instance=f"demo-pod-{i}",
                fleet=fleet,
                redis_url=url,
            )
        )
        for i in range(replicas)
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            stop = await stack.enter_async_context(StopSignals())
            for sc in sidecars:
                await stack.enter_async_context(sc)
            lines = [f"demo gateway   http://127.0.0.1:{gateway.addresses[0][1]}"]
            for sc in sidecars:
                lines.append(
                    f"{sc.settings.instance}     proxy http://127.0.0.1:{sc.proxy_port}  admin "
                    f"http://127.0.0.1:{sc.admin_port}/percentiles?scope=fleet"
                )
            print("\n".join(lines) + "\n", file=out, flush=True)
            traffic = [
                Traffic(f"http://127.0.0.1:{sc.proxy_port}", rps=rps / replicas) for sc in sidecars
            ]
            tasks = [asyncio.create_task(t.run()) for t in traffic]
            try:
                await _show(sidecars, refresh_s, duration, stop, out)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await gateway.cleanup()
    sent = sum(t.sent for t in traffic)
    print(f"demo finished: {sent} requests sent over {replicas} sidecars", file=out)
    return 0


async def _show(sidecars: list[Sidecar], refresh_s: float, duration: float | None,
                stop: StopSignals, out: TextIO) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    started = loop.time()
    tty = out.isatty()
    fleet = sidecars[0].fleet
    assert fleet is not None
    while not stop.stopping:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), refresh_s)
        await fleet.view.fresh()
        pods = _pods([(sc.settings.instance, sc.percentiles.snapshot()) for sc in sidecars])
        table = pods + "\n\n" + render_fleet(fleet.view)
        print((CLEAR if tty else "") + table + "\n", file=out, flush=True)
        if duration is not None and loop.time() - started >= duration:
            break
