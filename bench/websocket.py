"""WebSocket passthrough: handshake time and echo round trip, through the sidecar vs
direct; the sidecar's RSS idle and with 50 open sessions.

An aiohttp WebSocket echo server (this script, ``--upstream``) and `latency-sidecar run`
each run in their own process; the client (aiohttp) alternates direct and proxied
measurements so machine noise hits both alike.

    python bench/websocket.py [--handshakes 300] [--echoes 3000] [--sessions 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import free_port, sidecar_env, wait_port


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


def serve_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws", _echo)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"


async def measure(args: argparse.Namespace, direct: str, proxied: str, pid: int) -> None:
    targets = {"direct": direct, "sidecar": proxied}
    handshakes: dict[str, list[float]] = {k: [] for k in targets}
    echoes: dict[str, list[float]] = {k: [] for k in targets}
    async with aiohttp.ClientSession() as client:
        for _ in range(args.handshakes):
            for name, url in targets.items():
                t0 = time.perf_counter()
                ws = await client.ws_connect(url)
                handshakes[name].append(time.perf_counter() - t0)
                await ws.close()
        sessions = {name: await client.ws_connect(url) for name, url in targets.items()}
        message = "x" * 32
        for _ in range(args.echoes):
            for name, ws in sessions.items():
                t0 = time.perf_counter()
                await ws.send_str(message)
                await ws.receive()
                echoes[name].append(time.perf_counter() - t0)
        for ws in sessions.values():
            await ws.close()
        for name in targets:
            print(f"handshake {name:8}: {_ms(handshakes[name])}")
        for name in targets:
            print(f"echo 32 B {name:8}: {_ms(echoes[name])}")

        proc = psutil.Process(pid)
        idle = proc.memory_info().rss
        opened = [await client.ws_connect(proxied) for _ in range(args.sessions)]
        for ws in opened:
            await ws.send_str("x" * 1000)
            await ws.receive()
        busy = proc.memory_info().rss
        for ws in opened:
            await ws.close()
        print(f"sidecar RSS: {idle / 2**20:.1f} MiB idle, {busy / 2**20:.1f} MiB with "
              f"{args.sessions} sessions open")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--echoes", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    up_port, port, admin = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    env = sidecar_env(f"http://127.0.0.1:{up_port}", port, admin)
    sidecar = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env)
    try:
        wait_port(up_port)
        wait_port(port)
        asyncio.run(
            measure(
                args, f"http://127.0.0.1:{up_port}/ws", f"http://127.0.0.1:{port}/ws", sidecar.pid
            )
        )
    finally:
        for proc in (sidecar, upstream):
            proc.terminate()
            proc.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
