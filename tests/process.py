"""Real processes for tests: `python -m sidecar run` and the test upstream, each bound
to port 0, its real port read back from what it prints (no free-port race)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every process started here, so the session can end the ones a failed test left behind
SPAWNED: list[int] = []


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    stderr: bytearray = field(default_factory=bytearray)
    started: dict[str, str] = field(default_factory=dict)  # the `sidecar started` line

    @property
    def profiling_port(self) -> int:
        return int(self.started["profiling"].rsplit(":", 1)[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.kill()

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def wait_for_metric(self, sample: str, timeout: float = 10) -> None:
        """Poll ``/metrics`` (nothing can notify us) until it holds ``sample``."""
        async with aiohttp.ClientSession() as client, asyncio.timeout(timeout):
            while True:
                async with client.get(f"{self.admin}/metrics") as m:
                    if sample in await m.text():
                        return
                await asyncio.sleep(0.05)  # a poll, not a load on the process under test


def sidecar_env(upstream: str, **env: str) -> dict[str, str]:
    """The environment of a test sidecar: ours without SIDECAR_*, then ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full.update(
        SIDECAR_UPSTREAM_URL=upstream,
        SIDECAR_LISTEN="127.0.0.1:0",
        SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
        SIDECAR_LOG_FORMAT="json",
        SIDECAR_LOG_LEVEL="info",  # the `sidecar started` line carries the bound ports
    )
    full.update(env)
    return full


def started_fields(line: bytes) -> dict[str, str] | None:
    """The fields of the `sidecar started` log line (JSON or text format), else None."""
    try:
        doc = json.loads(line)
    except ValueError:
        text = line.decode(errors="replace")
        if "sidecar started " not in text:
            return None
        return dict(re.findall(r"(\w+)=(\S+)", text.split("sidecar started ", 1)[1]))
    if not isinstance(doc, dict) or doc.get("msg") != "sidecar started":
        return None
    return {k: str(v) for k, v in doc.items()}


def started_ports(line: bytes) -> tuple[int, int] | None:
    """(proxy, admin) ports from the `sidecar started` log line, else None."""
    fields = started_fields(line)
    if fields is None:
        return None
    return int(fields["listen"].rsplit(":", 1)[1]), int(fields["admin"].rsplit(":", 1)[1])


async def spawn_sidecar(upstream: str, **env: str) -> SidecarProcess:
    """Start `python -m sidecar run`; return once it has logged its bound ports."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        env=sidecar_env(upstream, **env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(proc.pid)
    assert proc.stderr is not None
    stderr = bytearray()
    async with asyncio.timeout(20):
        while True:
            line = await proc.stderr.readline()
            if not line:
                await proc.wait()
                raise RuntimeError(f"sidecar exited {proc.returncode}: {stderr.decode()}")
            stderr.extend(line)
            ports = started_ports(line)
            if ports is not None:
                break
    sp = SidecarProcess(proc, ports[0], ports[1], stderr, started_fields(line) or {})

    async def pump() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(4096):
            sp.stderr.extend(chunk)

    asyncio.get_running_loop().create_task(pump())
    return sp


class SyncProcess:
    """A subprocess that printed something to wait for (sync, for module fixtures)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        SPAWNED.append(self.proc.pid)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


def start_upstream() -> tuple[SyncProcess, int]:
    """The test upstream (tests/upstream.py) in its own process; returns it and its port."""
    up = SyncProcess([sys.executable, "-m", "tests.upstream"])
    assert up.proc.stdout is not None
    line = up.proc.stdout.readline()
    if not line.strip().isdigit():
        up.stop()
        raise RuntimeError(f"upstream did not start: {line!r}")
    return up, int(line)


def start_sidecar_sync(upstream: str, **env: str) -> tuple[SyncProcess, int, int]:
    """`python -m sidecar run` (sync); returns it with its proxy and admin ports."""
    sc = SyncProcess([sys.executable, "-m", "sidecar", "run"], sidecar_env(upstream, **env))
    assert sc.proc.stderr is not None
    seen = []
    for line in sc.proc.stderr:
        seen.append(line)
        ports = started_ports(line)
        if ports is not None:
            return sc, ports[0], ports[1]
    sc.stop()
    raise RuntimeError(f"sidecar did not start: {b''.join(seen).decode(errors='replace')}")


def connections_taken(admin_port: int, listener: str = "proxy") -> float:
    """Connections the sidecar has taken in on ``listener``: open now, plus those
    closed at once past the cap (from its `/metrics`)."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("listener") != listener:
                continue
            if s.name == "sidecar_connections_open" or (
                s.name == "sidecar_connections_rejected_total"
                and s.labels.get("reason") == "connection_limit"
            ):
                total += s.value
    return total


def wait_connections_taken(
    admin_port: int, n: int, since: float = 0.0, timeout: float = 15
) -> None:
    """Wait (polling: nothing can notify us) until the sidecar has taken in ``n`` more
    than ``since`` (an earlier `connections_taken`)."""
    deadline = time.monotonic() + timeout
    while (seen := connections_taken(admin_port) - since) < n:
        assert time.monotonic() < deadline, f"the sidecar took in {seen:g} of {n} connections"
        time.sleep(0.05)
