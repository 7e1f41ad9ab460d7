"""Startup, main loop and shutdown: wires proxy -> observers -> sinks and the listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web
from yarl import URL

from .admin import UpstreamProbe, build_admin_app
from .config import HostPort, Settings
from .exposition import metrics_handler
from .metrics import Metrics, QuantileCollector, RequestMetrics
from .percentiles import Percentiles
from .proxy import Proxy
from .routes import RouteLabeler

log = logging.getLogger(__name__)


def _bound_port(runner: web.BaseRunner) -> int:
    return int(runner.addresses[0][1])


class Sidecar:
    """One sidecar process's worth of components. `start()`, then `shutdown()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.labeler = RouteLabeler(settings.routes, settings.max_routes)
        self.percentiles = Percentiles(settings.windows_s)
        self.metrics = Metrics(settings.buckets_s)
        self.proxy = Proxy(
            settings, self.labeler, observers=[self.percentiles, RequestMetrics(self.metrics)]
        )
        self.metrics.in_flight.set_function(lambda: self.proxy.in_flight)
        self.metrics.registry.register(QuantileCollector(lambda: self.percentiles.last_snapshot))
        upstream = URL(settings.upstream_url)
        self.probe = UpstreamProbe(upstream.host or "127.0.0.1", upstream.port or 80)
        self._runners: list[web.BaseRunner] = []
        self._proxy_runner: web.ServerRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_shutdown: list[Callable[[float], Any]] = []
        self.proxy_port = 0
        self.admin_port = 0

    def admin_app(self) -> web.Application:
        return build_admin_app(
            self.proxy,
            self.probe,
            json_views={"/percentiles": lambda: self.percentiles.snapshot().as_json()},
            metrics=metrics_handler(self.metrics.registry, self.percentiles.snapshot),
        )

    def active_breach_names(self) -> list[str]:
        return []

    async def start(self) -> None:
        await self.proxy.start()
        self.spawn(self.percentiles.run(), "percentile-ticker")
        server = web.Server(
            self.proxy.handle,
            handler_cancellation=True,  # client gone -> its upstream request is cancelled
            access_log=None,
        )
        # in-flight requests are drained before the runner is cleaned up (see shutdown),
        # so its own timeout only covers requests that raced the listener closing
        self._proxy_runner = web.ServerRunner(
            server, shutdown_timeout=min(1.0, self.settings.shutdown_grace_s)
        )
        await self._proxy_runner.setup()
        await self._listen(self._proxy_runner, self.settings.listen, 2048)
        self.proxy_port = _bound_port(self._proxy_runner)

        admin_runner = web.AppRunner(self.admin_app(), access_log=None)
        await admin_runner.setup()
        self._runners.append(admin_runner)
        await self._listen(admin_runner, self.settings.admin_listen, 128)
        self.admin_port = _bound_port(admin_runner)
        log.info(
            "sidecar started",
            extra={
                "listen": f"{self.settings.listen.host}:{self.proxy_port}",
                "admin": f"{self.settings.admin_listen.host}:{self.admin_port}",
                "upstream": self.settings.upstream_url,
            },
        )

    @staticmethod
    async def _listen(runner: web.BaseRunner, where: HostPort, backlog: int) -> None:
        site = web.TCPSite(runner, where.host, where.port, backlog=backlog, reuse_address=True)
        await site.start()

    def spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def shutdown(self) -> None:
        """Drain per SPEC: readyz 503 at once, wait for in-flight requests (bounded by
        the grace period), refuse new connections, flush pending events, close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s
        self.proxy.draining = True
        log.info("draining", extra={"in_flight": self.proxy.in_flight})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                await self.proxy.wait_idle()
        if self.proxy.in_flight:
            log.warning("grace period over", extra={"in_flight": self.proxy.in_flight})
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        for hook in self._on_shutdown:
            await hook(max(1.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        await self.proxy.close()
        log.info("stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code (0)."""
    sidecar = Sidecar(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    await stop.wait()
    await sidecar.shutdown()
    return 0
