"""The reference: a bare aiohttp reverse proxy with no observation at all.

Same stack as the sidecar (aiohttp low-level server + client, uvloop), so the gap
between the two is the cost of what the sidecar adds. Usage:
    python bench/bare_proxy.py LISTEN_PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        async with session.request(
            request.method, upstream + request.raw_path, headers=request.headers, data=body
        ) as up:
            headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            resp = web.StreamResponse(status=up.status, headers=headers)
            try:
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except ConnectionResetError:  # client gone (wrk stopping): finish quietly
                return resp
            await resp.write_eof()
            return resp

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
