"""A tiny SSE upstream for the benchmark: the first event at once, then [DONE].

python bench/sse_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"delta": "hello"}\n\n')
    await asyncio.sleep(0.002)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/v1/stream", sse)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
