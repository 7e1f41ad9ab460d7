"""Responses the sidecar writes itself (errors, refusals): small JSON bodies, no
`Server` header (a proxy must not announce what it runs on), never an echo of what the
upstream or the client sent — but the request's id, made header- and JSON-safe."""

from __future__ import annotations

import json

from aiohttp import hdrs, web

from .forwarding import X_REQUEST_ID
from .printable import REQUEST_ID_MAX, header_safe


class PlainResponse(web.Response):
    """`web.Response` without the `Server` header aiohttp adds by default."""

    async def _write_headers(self) -> None:
        self._headers.popall(hdrs.SERVER, None)
        await super()._write_headers()


def error_response(status: int, kind: str, message: str, request_id: str) -> web.Response:
    """``{"error": {"type", "message", "request_id"}}``; the id is sent back too. A
    client's id with raw bytes or controls is sent back escaped (`printable`)."""
    request_id = header_safe(request_id, REQUEST_ID_MAX)
    body = {"error": {"type": kind, "message": message, "request_id": request_id}}
    response = PlainResponse(text=json.dumps(body), status=status, content_type="application/json")
    if request_id:
        response.headers[X_REQUEST_ID] = request_id
    return response
