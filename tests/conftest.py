from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import Settings, load_settings
from sidecar.events import Event
from sidecar.record import TimingRecord
from sidecar.server import Sidecar
from sidecar.ticker import Step, Ticker

from .upstream import Upstream

pytest_plugins = ["tests.redis_fixture", "tests.alertmanager_fixture", "tests.docker_env"]

# fixtures that start an external binary: a test using one is marked `tools`
_TOOL_FIXTURES = frozenset({"redis_server", "alertmanager"})


def pytest_sessionfinish(session: pytest.Session) -> None:
    """End the sidecar/upstream processes a failed test did not get to stop (only our
    own children: a PID that was reused by someone else is never touched)."""
    import os

    import psutil

    from .process import SPAWNED

    for pid in SPAWNED:
        with suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _TOOL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.tools)


def free_port() -> int:
    """A port free a moment ago: only for binaries that cannot bind port 0 and report
    it (start them with `tests.binaries.start_with_retry`, which retries on a clash)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free a moment ago (all held while they are chosen, so no
    two are the same); the same caveat as `free_port`: retry on a clash."""
    with ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port held bound but not listening for the test's duration: connecting to it is
    refused, and nothing else can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1, port 0; yields its URL (the bound port read back)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bound = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{bound}"
    finally:
        await runner.cleanup()


class Records:
    """An observer that keeps every record and lets tests wait for them."""

    def __init__(self) -> None:
        self.items: list[TimingRecord] = []
        self._changed = asyncio.Event()

    def observe(self, record: TimingRecord) -> None:
        self.items.append(record)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 10) -> list[TimingRecord]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.items


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    async with serve_app(up.app()) as url:
        yield up, url


SidecarFactory = Callable[..., Any]


class ManualTicker:
    """A `Ticker` that schedules nothing: the test advances windows and evaluates
    breaches itself (`sc.percentiles.tick()`, `sc.detector.evaluate()`), exactly when
    it means to."""

    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}

    def every(self, interval_s: float, step: Step, name: str) -> None:
        self.steps[name] = step


def advance(sc: Sidecar, seconds: int = 1) -> list[Event]:
    """With a `ManualTicker`: ``seconds`` window ticks, then one breach evaluation."""
    for _ in range(seconds):
        sc.percentiles.tick()
    return sc.detector.evaluate()


@pytest.fixture
async def make_sidecar() -> AsyncIterator[SidecarFactory]:
    async def factory(upstream_url: str, ticker: Ticker | None = None, **overrides: Any) -> Sidecar:
        settings: Settings = load_settings(
            upstream_url=upstream_url,
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            instance="test-pod",
            **{"shutdown_grace_s": 0.5, **overrides},
        )
        sc = Sidecar(settings, ticker=ticker)
        await stack.enter_async_context(sc)
        return sc

    async with AsyncExitStack() as stack:
        yield factory


@asynccontextmanager
async def observed_sidecar(
    make_sidecar: SidecarFactory, upstream_url: str, **client_options: Any
) -> AsyncIterator[tuple[Sidecar, Records, aiohttp.ClientSession, str]]:
    """A sidecar in front of ``upstream_url`` with every record kept, and a client
    session: (sidecar, records, client, the proxy's base URL)."""
    sc = await make_sidecar(upstream_url)
    records = Records()
    sc.proxy.add_observer(records)
    async with aiohttp.ClientSession(**client_options) as client:
        yield sc, records, client, f"http://127.0.0.1:{sc.proxy_port}"


@pytest.fixture
async def proxied(
    upstream: tuple[Upstream, str], make_sidecar: SidecarFactory
) -> AsyncIterator[tuple[Upstream, Sidecar, Records, aiohttp.ClientSession, str]]:
    up, url = upstream
    async with observed_sidecar(make_sidecar, url, auto_decompress=False) as observed:
        yield (up, *observed)
