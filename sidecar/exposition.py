"""`GET /metrics`: Prometheus text or OpenMetrics (with exemplars), as the scraper asks.

Encoding runs on a worker thread so a large exposition never stalls proxied traffic;
anything read from loop-owned state is refreshed on the loop first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


def metrics_handler(
    registry: CollectorRegistry, before_scrape: Callable[[], object] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handler
