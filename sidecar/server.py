"""Startup, main loop and shutdown.

    listener -> Proxy --TimingRecord--> Percentiles, RequestMetrics, SlowRequests
    Percentiles --snapshot--> BreachDetector --Event--> EventBus --> sinks

`Sidecar` builds the components (no I/O happens in its constructor). Entering it
(``async with Sidecar(settings) as sidecar``) starts them as resources on one
`AsyncExitStack`: the upstream pool, then every listener (all bound before any
background work starts, so a taken port leaves nothing running), then the sinks'
delivery tasks and the periodic steps. Leaving it drains (`drain`) and tears down in
reverse order, after a full start, a failed start or a signal alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from .admin import UpstreamProbe, build_admin_app
from .anatomy.metrics import AnatomyMetrics
from .anatomy.observer import Anatomy, percentiles_document
from .breach import BreachDetector, BreachPolicy, SlowRequests
from .config import Settings, redact_url
from .connections import GuardedAppRunner, GuardedServer, Limits
from .events import EventBus
from .exposition import metrics_handler
from .fleet import Fleet
from .listeners import close, listening
from .metrics import Metrics, QuantileCollector, RequestMetrics, WebSocketMetrics
from .percentiles import Percentiles
from .profiling import Profiler
from .proxy import Proxy
from .routes import RouteLabeler
from .runtime import LoopLag, RuntimeCollector, RuntimeStats, Target
from .signals import StopSignals
from .sinks import build_sinks
from .ticker import LoopTicker, Ticker
from .tunnel import Tunnels

log = logging.getLogger(__name__)
ADMIN_MAX_CONNECTIONS = 256


class Sidecar:
    """One sidecar process's worth of components."""

    def __init__(self, settings: Settings, *, ticker: Ticker | None = None) -> None:
        """``ticker``: who runs the periodic steps; default, the event loop. A test
        passes one that schedules nothing (tests/conftest.py) to advance windows and
        evaluate breaches itself."""
        self.settings = s = settings
        self._ticker = ticker
        self.labeler = RouteLabeler(s.routes, s.max_routes)
        self.metrics = Metrics(s.buckets_s)
        self.percentiles = Percentiles(s.windows_s)
        request_metrics = RequestMetrics(self.metrics)
        self.anatomy = Anatomy(s.windows_s, AnatomyMetrics(self.metrics, s.buckets_s))
        self.anatomy.link(self.percentiles, request_metrics.route_series)
        self.loop_lag = LoopLag()
        self.bus = EventBus(self.metrics.events, build_sinks(s, self.metrics))
        policy = BreachPolicy(
            s.instance, s.breach_window_s, s.min_samples, s.eval_interval_s,
            s.p95_threshold_ms, s.p99_threshold_ms, s.ttft_p95_threshold_ms,
            s.tpot_p95_threshold_ms,
        )  # fmt: skip
        self.detector = BreachDetector(
            policy, self.percentiles, self.bus, self.metrics, self.anatomy, self.loop_lag
        )
        self.fleet = Fleet(s, policy, self.percentiles, self.bus, self.metrics) if s.fleet else None
        self.proxy = Proxy(
            s.upstream_url,
            self.labeler,
            observers=[
                self.percentiles,
                request_metrics,
                SlowRequests(s.slow_request_ms, s.instance, self.bus, self.metrics),
            ],
            content_observers=[self.anatomy],
            upstream_timeout_s=s.upstream_timeout_s,
            client_idle_timeout_s=s.client_idle_timeout_s,
            tunnels=Tunnels(WebSocketMetrics(self.metrics)),
        )
        self.metrics.in_flight.set_function(lambda: self.proxy.in_flight)
        self.metrics.websocket_active.set_function(lambda: len(self.proxy.tunnels))
        self.metrics.registry.register(QuantileCollector(lambda: self.percentiles.last_snapshot))
        self.runtime = RuntimeStats(
            Target(s.target_pid, s.target_name), self.loop_lag, lambda: self.proxy.in_flight
        )
        self.metrics.registry.register(RuntimeCollector(self.runtime))
        self.probe = UpstreamProbe(s.upstream_url)
        self.proxy_port = 0
        self.admin_port = 0
        self.profiling_port: int | None = None
        self.profiler: Profiler | None = None
        self._proxy_runner: web.ServerRunner | None = None
        self._stack: AsyncExitStack | None = None
        self._drained = False

    def _limits(self, max_connections: int) -> Limits:
        s = self.settings
        return Limits(
            max_connections=max_connections,
            header_timeout_s=s.client_header_timeout_s,
            keepalive_timeout_s=s.keepalive_timeout_s,
            idle_timeout_s=s.client_idle_timeout_s,
        )

    def admin_app(self) -> web.Application:
        return build_admin_app(
            lambda: self.proxy.draining,
            self.probe,
            json_views={
                "/percentiles": lambda: percentiles_document(
                    self.percentiles.snapshot(), self.anatomy, self.loop_lag
                ),
                "/breaches": lambda: {
                    "active": self.detector.active_json(),
                    "recent": self.bus.recent_json(),
                },
                "/stats": self.runtime.document,
            },
            scoped_views=(
                {
                    ("/percentiles", "fleet"): self.fleet.percentiles_json,
                    ("/breaches", "fleet"): self.fleet.breaches_json,
                }
                if self.fleet
                else {}
            ),
            metrics=metrics_handler(self.metrics.registry, self.percentiles.snapshot),
        )

    async def __aenter__(self) -> Sidecar:
        stack = AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._stack is not None
        try:
            await self.drain()
        finally:  # a drain cut short (cancelled, failed) still releases everything
            await self._stack.aclose()
        log.info("stopped")

    async def _start(self, stack: AsyncExitStack) -> None:
        s = self.settings
        reject = self.metrics.connections_rejected.labels
        await stack.enter_async_context(self.proxy)

        # every listener is bound before any background work starts
        admin = GuardedAppRunner(
            self.admin_app(),
            self._limits(ADMIN_MAX_CONNECTIONS),
            lambda reason: reject("admin", reason).inc(),
        )
        self.admin_port = await stack.enter_async_context(
            listening(admin, s.admin_listen, "SIDECAR_ADMIN_LISTEN", backlog=128)
        )
        if s.profiling_enabled:
            self.profiler = Profiler(s.profiling_token.get_secret_value(), self.runtime.document)
            self.profiling_port = await stack.enter_async_context(
                listening(
                    web.AppRunner(self.profiler.app(), access_log=None),
                    s.profiling_listen,
                    "SIDECAR_PROFILING_LISTEN",
                    backlog=16,
                )
            )
        proxy_server = GuardedServer(
            self.proxy.handle,
            limits=self._limits(s.effective_max_connections),
            reject=lambda reason: reject("proxy", reason).inc(),
            handler_cancellation=True,  # client gone -> its upstream request is cancelled
            access_log=None,
        )
        self.metrics.connections_open.labels("proxy").set_function(lambda: proxy_server.open_count)
        # in-flight requests are drained before the runner is cleaned up (see drain),
        # so its own timeout only covers requests that raced the listener closing
        self._proxy_runner = web.ServerRunner(
            proxy_server, shutdown_timeout=min(1.0, s.shutdown_grace_s)
        )
        self.proxy_port = await stack.enter_async_context(
            listening(self._proxy_runner, s.listen, "SIDECAR_LISTEN", backlog=2048)
        )

        # background work: event delivery and the periodic steps
        for sink in self.bus.sinks:
            await stack.enter_async_context(sink)
        ticker = self._ticker
        if ticker is None:
            ticker = await stack.enter_async_context(LoopTicker())
        ticker.every(1, self.percentiles.tick, "percentile-ticker")
        if s.breach_scope != "fleet":
            ticker.every(s.eval_interval_s, self.detector.evaluate, "breach-detector")
        if self.fleet is not None:
            await stack.enter_async_context(self.fleet)
        ticker.every(1, proxy_server.sweep, "connection-sweep")
        ticker.every(1, admin.guarded.sweep, "admin-connection-sweep")
        lag = asyncio.create_task(self.loop_lag.run(), name="loop-lag")
        stack.push_async_callback(_cancel, lag)

        log.info(
            "sidecar started",
            extra={
                "listen": f"{s.listen.host}:{self.proxy_port}",
                "admin": f"{s.admin_listen.host}:{self.admin_port}",
                "upstream": redact_url(s.upstream_url),
                "sinks": [sink.label for sink in self.bus.sinks],
                "max_connections": s.effective_max_connections,
                "profiling": (
                    f"{s.profiling_listen.host}:{self.profiling_port}"
                    if self.profiling_port
                    else "off"
                ),
            },
        )

    async def drain(self) -> None:
        """SIGTERM: `/readyz` turns 503 at once; the proxy listener keeps accepting
        while in-flight requests finish (their responses carry ``Connection: close``)
        and WebSocket sessions go on, for at most SIDECAR_SHUTDOWN_GRACE_S; then open
        sessions are closed and the listener closes. Pending events get what is
        left of the grace period, and at least two seconds, to be delivered (a sink that
        has been failing gives up sooner and counts what it drops). Then everything
        else stops, in reverse order of starting."""
        if self._drained:
            return
        self._drained = True
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_s
        deadline = loop.time() + grace
        self.proxy.draining = True
        log.info("draining", extra={"in_flight": self.proxy.in_flight})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.proxy.wait_idle()
                await self.proxy.tunnels.wait_closed()
        if self.proxy.in_flight:
            log.warning("grace period over", extra={"in_flight": self.proxy.in_flight})
        await self.proxy.tunnels.close_all()  # WebSocket sessions: close="shutdown"
        if self._proxy_runner is not None:
            await close(self._proxy_runner)
        await self.bus.flush(max(2.0, deadline - loop.time()))


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain and return the exit code (0)."""
    async with StopSignals() as stop, Sidecar(settings):
        # everything allocated so far (modules, config, app) lives as long as the
        # process: move it out of the collector's generations so full collections stay short
        gc.collect()
        gc.freeze()
        await stop.wait()
    return 0
