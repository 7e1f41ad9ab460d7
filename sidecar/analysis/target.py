"""What `analyze` measures: a running sidecar named by the environment, or the
embedded demo (demo gateway + sidecar as subprocesses, profiling on, free ports)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from ..config import ConfigError

ENV_URL = "SIDECAR_ANALYZE_URL"
ENV_ADMIN = "SIDECAR_ANALYZE_ADMIN_URL"
ENV_PROFILING = "SIDECAR_ANALYZE_PROFILING_URL"
ENV_TOKEN = "SIDECAR_PROFILING_TOKEN"


@dataclass(frozen=True)
class Target:
    proxy_url: str  # where the load goes
    admin_url: str  # /stats, /percentiles, /metrics
    profiling_url: str | None  # /debug/pprof/*; None: no profiles
    token: str
    embedded: bool
    gateway_pid: int | None = None


def _url(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name}: expected an http:// or https:// URL, got {value!r}")
    return value


def from_env(env: Mapping[str, str]) -> Target | None:
    """The running sidecar to analyse, or None when the environment names none."""
    proxy = _url(env, ENV_URL)
    admin = _url(env, ENV_ADMIN)
    profiling = _url(env, ENV_PROFILING)
    if not proxy:
        if admin or profiling:
            raise ConfigError(f"{ENV_URL}: is required with {ENV_ADMIN} / {ENV_PROFILING}")
        return None
    if not admin:
        raise ConfigError(f"{ENV_ADMIN}: is required with {ENV_URL} (the sidecar's admin URL)")
    token = env.get(ENV_TOKEN, "")
    if profiling and not token:
        raise ConfigError(f"{ENV_TOKEN}: is required with {ENV_PROFILING}")
    return Target(proxy, admin, profiling or None, token, embedded=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_http(url: str, proc: asyncio.subprocess.Process, what: str) -> None:
    async with aiohttp.ClientSession() as client, asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the embedded {what} exited with status {proc.returncode}")
            try:
                async with client.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def embedded_demo(extra_delay_ms: float = 0.0) -> AsyncIterator[Target]:
    """The demo gateway and a sidecar in front of it, each its own process (so the
    gateway's CPU and memory are a process of their own, as in a pod)."""
    gw, proxy, admin, prof = (_free_port() for _ in range(4))
    token = secrets.token_urlsafe(32)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    exe = [sys.executable, "-m", "sidecar"]
    procs: list[asyncio.subprocess.Process] = []
    try:
        gateway = await asyncio.create_subprocess_exec(
            *exe, "demo-gateway", "--listen", f"127.0.0.1:{gw}",
            "--add-delay-ms", str(extra_delay_ms),
            env=base_env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(gateway)
        await _wait_http(f"http://127.0.0.1:{gw}/healthz", gateway, "demo gateway")
        sidecar_env = {
            **base_env,
            "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{gw}",
            "SIDECAR_LISTEN": f"127.0.0.1:{proxy}",
            "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "SIDECAR_PROFILING_ENABLED": "true",
            "SIDECAR_PROFILING_LISTEN": f"127.0.0.1:{prof}",
            "SIDECAR_PROFILING_TOKEN": token,
            "SIDECAR_TARGET_PID": str(gateway.pid),
            "SIDECAR_LOG_LEVEL": "warning",
        }
        sidecar = await asyncio.create_subprocess_exec(
            *exe, "run", env=sidecar_env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(sidecar)
        await _wait_http(f"http://127.0.0.1:{admin}/healthz", sidecar, "sidecar")
        yield Target(
            f"http://127.0.0.1:{proxy}",
            f"http://127.0.0.1:{admin}",
            f"http://127.0.0.1:{prof}",
            token,
            embedded=True,
            gateway_pid=gateway.pid,
        )
    finally:
        for p in reversed(procs):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
