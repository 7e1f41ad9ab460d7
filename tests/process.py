"""Run the real `python -m sidecar` in a subprocess, on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field

import aiohttp

from .conftest import free_port


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def wait_for_metric(self, sample: str, timeout: float = 10) -> None:
        """Poll ``/metrics`` (nothing can notify us) until it holds ``sample``."""
        async with aiohttp.ClientSession() as client, asyncio.timeout(timeout):
            while True:
                async with client.get(f"{self.admin}/metrics") as m:
                    if sample in await m.text():
                        return


async def spawn_sidecar(upstream: str, **env: str) -> SidecarProcess:
    port, admin_port = free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full_env.update(
        SIDECAR_UPSTREAM_URL=upstream,
        SIDECAR_LISTEN=f"127.0.0.1:{port}",
        SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        **env,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        env=full_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    sp = SidecarProcess(proc, port, admin_port)

    async def pump() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(4096):
            sp.stderr.extend(chunk)

    asyncio.get_running_loop().create_task(pump())
    async with aiohttp.ClientSession() as client:
        async with asyncio.timeout(20):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"sidecar exited: {sp.stderr.decode()}")
                try:
                    async with client.get(f"{sp.admin}/healthz") as r:
                        if r.status == 200:
                            return sp
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
