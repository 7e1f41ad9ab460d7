"""The admin listener: health, readiness, and the JSON/metrics views of the observers.

Each view is a plain callable handed in by the server; this module only speaks HTTP.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from yarl import URL

JsonView = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]
MetricsView = Callable[[web.Request], Awaitable[web.Response]]


class UpstreamProbe:
    """Is the upstream accepting TCP connections? Cached for one second."""

    def __init__(self, upstream_url: str, timeout: float = 1.0) -> None:
        url = URL(upstream_url)
        self._host = url.host or "127.0.0.1"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._timeout = timeout
        self._checked_at = -1e9
        self._ok = False
        self._lock = asyncio.Lock()

    async def ok(self) -> bool:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if loop.time() - self._checked_at < 1.0:
                return self._ok
            try:
                async with asyncio.timeout(self._timeout):
                    _, writer = await asyncio.open_connection(self._host, self._port)
                writer.close()
                self._ok = True
            except (OSError, TimeoutError):
                self._ok = False
            self._checked_at = loop.time()
            return self._ok


def build_admin_app(
    draining: Callable[[], bool],
    probe: UpstreamProbe,
    *,
    json_views: dict[str, JsonView] | None = None,
    scoped_views: dict[tuple[str, str], JsonView] | None = None,
    metrics: MetricsView | None = None,
) -> web.Application:
    """``scoped_views``: ``(path, scope) -> view`` answers ``GET path?scope=...``
    (``/percentiles?scope=fleet``); without ``scope`` (or ``scope=instance``) the
    path's plain view answers."""
    app = web.Application()
    app.on_response_prepare.append(_no_server_header)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if draining():
            return web.json_response({"status": "draining"}, status=503)
        if not await probe.ok():
            return web.json_response({"status": "upstream unavailable"}, status=503)
        return web.json_response({"status": "ready"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    scoped = scoped_views or {}
    for path, view in (json_views or {}).items():
        scopes = {scope: v for (p, scope), v in scoped.items() if p == path}
        app.router.add_get(path, _json_handler(view, scopes))
    if metrics is not None:
        app.router.add_get("/metrics", metrics)
    return app


async def _no_server_header(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall(hdrs.SERVER, None)


def _json_handler(
    view: JsonView, scopes: dict[str, JsonView]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        chosen = view
        scope = request.query.get("scope", "instance")
        if scope != "instance":
            if scope not in scopes:
                known = ", ".join(["instance", *sorted(scopes)])
                return web.json_response(
                    {"error": f"unknown scope; here: {known} (fleet needs SIDECAR_FLEET)"},
                    status=404,
                )
            chosen = scopes[scope]
        doc = chosen()
        if inspect.isawaitable(doc):
            doc = await doc
        return web.json_response(doc)

    return handler
