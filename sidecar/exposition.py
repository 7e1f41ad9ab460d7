"""`GET /metrics`: Prometheus text, OpenMetrics (with exemplars) or the Prometheus
protobuf format (with native histograms), as the scraper's `Accept` header asks.

Negotiation: the media range with the highest q-value among those we serve wins (ties:
the first listed); protobuf needs
``application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited``.
Text and OpenMetrics, with their versions and escaping, stay prometheus-client's.
Encoding runs on a worker thread so a large exposition never stalls proxied traffic;
anything read from loop-owned state is refreshed on the loop first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import exposition_pb, promproto

Encoder = Callable[[CollectorRegistry], bytes]
_PROTOBUF = "application/vnd.google.protobuf"
_TEXT = frozenset({"text/plain", "text/*", "*/*"})


def negotiate(accept: str) -> tuple[Encoder, str]:
    """The encoder and Content-Type for an `Accept` header (text when nothing matches)."""
    best: tuple[float, str] | None = None  # (q, media range)
    for media_range in accept.split(","):
        media, _, rest = media_range.partition(";")
        media = media.strip().lower()
        params = {}
        for param in rest.split(";"):
            key, _, value = param.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        if media == _PROTOBUF:
            if params.get("proto") != "io.prometheus.client.MetricFamily" or (
                params.get("encoding") != "delimited"
            ):
                continue
        elif media != "application/openmetrics-text" and media not in _TEXT:
            continue
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            continue
        if q > 0 and (best is None or q > best[0]):
            best = (q, media_range)
    if best is None:
        return choose_encoder("")
    if best[1].partition(";")[0].strip().lower() == _PROTOBUF:
        return exposition_pb.generate, promproto.CONTENT_TYPE
    return choose_encoder(best[1])


def metrics_handler(
    registry: CollectorRegistry, before_scrape: Callable[[], object] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        encoder, content_type = negotiate(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, registry)
        return web.Response(body=body, headers={"Content-Type": content_type, "Vary": "Accept"})

    return handler
