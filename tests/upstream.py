"""A real upstream HTTP server for tests, with handlers for every proxy behaviour."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from typing import Any

from aiohttp import web

GZIP_BODY = gzip.compress(b'{"hello": "compressed world"}' * 50)


class Upstream:
    """Handlers record what they saw; events let tests orchestrate timing."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.arrived = 0
        self.arrived_event = asyncio.Event()
        self.expect_arrivals = 0
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.sse_gate = asyncio.Event()
        self.delays: list[float] = []
        self.durations: list[float] = []  # the upstream's own handling time of /sleep

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_post("/hash", self.hash_body)
        r.add_get("/download/{size}", self.download)
        r.add_get("/chunked", self.chunked)
        r.add_get("/cookies", self.cookies)
        r.add_get("/gzip", self.gzipped)
        r.add_get("/hop", self.hop)
        r.add_get("/hop-lower", self.hop_lower)
        r.add_get("/sse", self.sse)
        r.add_get("/hold", self.hold)
        r.add_get("/hang", self.hang)
        r.add_get("/status/{code}", self.status)
        r.add_get("/sleep/{ms}", self.sleep)
        r.add_get("/slow-stream/{ms}", self.slow_stream)
        r.add_route("*", "/v1/{tail:(?s:.*)}", self.sleep_default)  # any byte, even %0a
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": list(request.headers.items()),
                "body": body,
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            }
        )
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "len": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                # the head as it arrived, bytes kept (latin-1 maps each byte to a char)
                "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                for k, v in request.raw_headers],
            }
        )  # fmt: skip

    async def hash_body(self, request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"len": n, "sha256": h.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        block = bytes(range(256)) * 256  # 64 KiB, deterministic
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part-{i};".encode())
        await resp.write_eof()
        return resp

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BODY,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def hop(self, request: web.Request) -> web.Response:
        self.seen.append({"headers": list(request.headers.items())})
        return web.Response(
            text="hop",
            headers={
                "Connection": "keep-alive, X-Private",
                "Keep-Alive": "timeout=5",
                "X-Private": "secret",
                "Proxy-Authenticate": "Basic",
                "X-Public": "yes",
            },
        )

    async def hop_lower(self, request: web.Request) -> web.StreamResponse:
        """Hop-by-hop headers in lower case, as many servers send them."""
        self.seen.append({"headers": list(request.headers.items())})
        resp = web.StreamResponse(headers={"x-public": "yes", "keep-alive": "timeout=5",
                                           "connection": "keep-alive, x-private",
                                           "x-private": "secret"})  # fmt: skip
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"lower")
        await resp.write_eof()
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.wait_for(self.sse_gate.wait(), 10)
        for i in range(3):
            await resp.write(f"data: token-{i}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def hold(self, request: web.Request) -> web.Response:
        self.arrived += 1
        if self.arrived >= self.expect_arrivals:
            self.arrived_event.set()
        await asyncio.wait_for(self.release.wait(), 30)
        return web.json_response({"held": True})

    async def hang(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.Response(text="never")

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = {"ETag": '"v1"'} if code == 304 else {}
        return web.Response(status=code, headers=headers)

    async def sleep(self, request: web.Request) -> web.Response:
        t0 = asyncio.get_running_loop().time()
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        self.durations.append(asyncio.get_running_loop().time() - t0)
        return web.json_response({"slept_ms": int(request.match_info["ms"])})

    async def slow_stream(self, request: web.Request) -> web.StreamResponse:
        """First event at once, the rest after ``ms`` milliseconds."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def sleep_default(self, request: web.Request) -> web.Response:
        await request.read()
        delay = self.delays.pop(0) if self.delays else 0.0
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"ok": True})


async def _serve_forever() -> None:
    """`python -m tests.upstream`: serve on an ephemeral port, print it, run until killed."""
    runner = web.AppRunner(Upstream().app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_forever())
