"""What `analyze` measures: a running sidecar named by the environment, or the
embedded demo (demo gateway + sidecar as subprocesses, profiling on, each bound to
port 0 and reporting the port it got)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

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


async def _read_until(stream: asyncio.StreamReader | None, what: str, parse: Any) -> Any:
    """Read lines until ``parse(line)`` returns something (the process reports where it
    listens); the ports are the processes' own, bound to 0, so nothing can race for them."""
    assert stream is not None
    async with asyncio.timeout(30):
        while line := await stream.readline():
            found = parse(line)
            if found is not None:
                return found
    raise RuntimeError(f"the embedded {what} exited before it listened")


def _gateway_port(line: bytes) -> int | None:
    m = re.match(rb"demo gateway listening on \S+:(\d+)", line)
    return int(m.group(1)) if m else None


def _sidecar_ports(line: bytes) -> dict[str, int] | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("msg") != "sidecar started":
        return None
    return {k: int(str(doc[k]).rsplit(":", 1)[1]) for k in ("listen", "admin", "profiling")}


async def _drain(stream: asyncio.StreamReader | None) -> None:
    """Keep reading a child's output so a full pipe never blocks it."""
    assert stream is not None
    while await stream.read(65536):
        pass


@contextlib.asynccontextmanager
async def embedded_demo(extra_delay_ms: float = 0.0) -> AsyncIterator[Target]:
    """The demo gateway and a sidecar in front of it, each its own process (so the
    gateway's CPU and memory are a process of their own, as in a pod)."""
    token = secrets.token_urlsafe(32)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    exe = [sys.executable, "-m", "sidecar"]
    procs: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []
    try:
        gateway = await asyncio.create_subprocess_exec(
            *exe, "demo-gateway", "--listen", "127.0.0.1:0",
            "--add-delay-ms", str(extra_delay_ms),
            env=base_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(gateway)
        gw = await _read_until(gateway.stdout, "demo gateway", _gateway_port)
        drains.append(asyncio.create_task(_drain(gateway.stdout)))
        sidecar_env = {
            **base_env,
            "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{gw}",
            "SIDECAR_LISTEN": "127.0.0.1:0",
            "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
            "SIDECAR_PROFILING_ENABLED": "true",
            "SIDECAR_PROFILING_LISTEN": "127.0.0.1:0",
            "SIDECAR_PROFILING_TOKEN": token,
            "SIDECAR_TARGET_PID": str(gateway.pid),
            "SIDECAR_LOG_LEVEL": "info",  # the `sidecar started` line names the ports
        }
        sidecar = await asyncio.create_subprocess_exec(
            *exe, "run", env=sidecar_env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(sidecar)
        ports = await _read_until(sidecar.stderr, "sidecar", _sidecar_ports)
        drains.append(asyncio.create_task(_drain(sidecar.stderr)))
        yield Target(
            f"http://127.0.0.1:{ports['listen']}",
            f"http://127.0.0.1:{ports['admin']}",
            f"http://127.0.0.1:{ports['profiling']}",
            token,
            embedded=True,
            gateway_pid=gateway.pid,
        )
    finally:
        for p in reversed(procs):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for task in drains:
            task.cancel()
        for p in reversed(procs):
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
