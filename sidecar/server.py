"""Startup, main loop and shutdown: wires proxy -> observers -> sinks and the listeners.

proxy --TimingRecord--> Percentiles, RequestMetrics, SlowRequests
Percentiles --snapshot--> BreachDetector --Event--> EventBus --> sinks
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .admin import UpstreamProbe, build_admin_app
from .breach import BreachDetector, SlowRequests
from .config import HostPort, Settings
from .events import EventBus
from .exposition import metrics_handler
from .metrics import Metrics, QuantileCollector, RequestMetrics
from .percentiles import Percentiles
from .profiling import Profiler
from .proxy import Proxy
from .routes import RouteLabeler
from .sinks.alertmanager import AlertmanagerSink
from .sinks.queue import QueuedSink
from .sinks.redis_stream import RedisStreamSink
from .sinks.webhook import WebhookSink
from .stats import LoopLag, RuntimeCollector, RuntimeStats, Target

log = logging.getLogger(__name__)


def _bound_port(runner: web.BaseRunner) -> int:
    return int(runner.addresses[0][1])


class Sidecar:
    """One sidecar process's worth of components. `start()`, then `shutdown()`."""

    def __init__(self, settings: Settings, *, manual_clock: bool = False) -> None:
        """``manual_clock``: do not start the percentile ticker and breach evaluation
        loops; the caller drives `percentiles.tick()` and `detector.evaluate()`."""
        self.settings = settings
        self.manual_clock = manual_clock
        self.labeler = RouteLabeler(settings.routes, settings.max_routes)
        self.metrics = Metrics(settings.buckets_s)
        self.percentiles = Percentiles(settings.windows_s)
        self.bus = EventBus(self.metrics)
        self.detector = BreachDetector(settings, self.percentiles, self.bus, self.metrics)
        self.proxy = Proxy(
            settings,
            self.labeler,
            observers=[
                self.percentiles,
                RequestMetrics(self.metrics),
                SlowRequests(settings, self.bus, self.metrics),
            ],
        )
        self.metrics.in_flight.set_function(lambda: self.proxy.in_flight)
        self.metrics.registry.register(QuantileCollector(lambda: self.percentiles.last_snapshot))
        self.loop_lag = LoopLag()
        self.runtime = RuntimeStats(
            Target(settings.target_pid, settings.target_name),
            self.loop_lag,
            lambda: self.proxy.in_flight,
        )
        self.metrics.registry.register(RuntimeCollector(self.runtime))
        upstream = URL(settings.upstream_url)
        self.probe = UpstreamProbe(upstream.host or "127.0.0.1", upstream.port or 80)
        self.redis_sink: RedisStreamSink | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.BaseRunner] = []
        self._proxy_runner: web.ServerRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.proxy_port = 0
        self.admin_port = 0
        self.profiling_port: int | None = None

    def _build_sinks(self) -> list[QueuedSink]:
        s = self.settings
        sinks: list[QueuedSink] = []
        if s.redis_url:
            self.redis_sink = RedisStreamSink(s, self.metrics)
            sinks.append(self.redis_sink)
        if s.webhook_urls or s.alertmanager_url:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        for url in s.webhook_urls:
            assert self._session is not None
            sinks.append(
                WebhookSink(
                    url,
                    fmt=s.webhook_format,
                    secret=s.webhook_secret.get_secret_value(),
                    capacity=s.event_buffer,
                    metrics=self.metrics,
                    session=self._session,
                )
            )
        if s.alertmanager_url:
            assert self._session is not None
            sinks.append(
                AlertmanagerSink(
                    s.alertmanager_url,
                    capacity=s.event_buffer,
                    metrics=self.metrics,
                    session=self._session,
                )
            )
        return sinks

    def breaches_view(self) -> dict[str, Any]:
        return {
            "active": self.detector.active_json(),
            "recent": [e.as_json() for e in reversed(self.bus.recent)],
        }

    def active_breach_names(self) -> list[str]:
        return [
            f"{a['route']} {'stream ' if a['stream'] else ''}{a['quantile']}={a['value_ms']}ms"
            f" ({a['severity']})"
            for a in self.detector.active_json()
        ]

    def admin_app(self) -> web.Application:
        return build_admin_app(
            self.proxy,
            self.probe,
            json_views={
                "/percentiles": lambda: self.percentiles.snapshot().as_json(),
                "/breaches": self.breaches_view,
                "/stats": self.runtime.document,
            },
            metrics=metrics_handler(self.metrics.registry, self.percentiles.snapshot),
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def start(self) -> None:
        self.bus.sinks = list(self._build_sinks())
        await self.proxy.start()
        if not self.manual_clock:
            self.spawn(self.percentiles.run(), "percentile-ticker")
            self.spawn(self.detector.run(), "breach-detector")
        self.spawn(self.loop_lag.run(), "loop-lag")
        for sink in self.bus.sinks:
            self.spawn(sink.run(), f"sink-{sink.name}")
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
        if self.settings.profiling_enabled:
            profiler = Profiler(
                self.settings.profiling_token.get_secret_value(), self.runtime.document
            )
            prof_runner = web.AppRunner(profiler.app(), access_log=None)
            await prof_runner.setup()
            self._runners.append(prof_runner)
            await self._listen(prof_runner, self.settings.profiling_listen, 16)
            self.profiling_port = _bound_port(prof_runner)
        log.info(
            "sidecar started",
            extra={
                "listen": f"{self.settings.listen.host}:{self.proxy_port}",
                "admin": f"{self.settings.admin_listen.host}:{self.admin_port}",
                "upstream": self.settings.upstream_url,
                "sinks": [sink.label for sink in self.bus.sinks],
                "profiling": (
                    f"{self.settings.profiling_listen.host}:{self.profiling_port}"
                    if self.profiling_port
                    else "off"
                ),
            },
        )

    @staticmethod
    async def _listen(runner: web.BaseRunner, where: HostPort, backlog: int) -> None:
        site = web.TCPSite(runner, where.host, where.port, backlog=backlog, reuse_address=True)
        await site.start()

    async def shutdown(self) -> None:
        """Drain per SPEC: readyz 503 at once, wait for in-flight requests (bounded by
        the grace period), refuse new connections, flush pending events, close."""
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_s
        deadline = loop.time() + grace
        self.proxy.draining = True
        log.info("draining", extra={"in_flight": self.proxy.in_flight})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.proxy.wait_idle()
        if self.proxy.in_flight:
            log.warning("grace period over", extra={"in_flight": self.proxy.in_flight})
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        # events get what is left of the grace period, and at least a second or two
        await self.bus.flush(max(2.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        await self.proxy.close()
        if self.redis_sink is not None:
            await self.redis_sink.close()
        if self._session is not None:
            await self._session.close()
        log.info("stopped")


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code (0)."""
    sidecar = Sidecar(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    # everything allocated so far (modules, config, app) lives as long as the process:
    # move it out of the collector's generations so full collections stay short
    gc.collect()
    gc.freeze()
    await stop.wait()
    await sidecar.shutdown()
    return 0
