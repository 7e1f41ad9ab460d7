"""A real upstream HTTP server for tests, with handlers for every proxy behaviour."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

GZIP_BODY = gzip.compress(b'{"hello": "compressed world"}' * 50)


async def burst(
    client: aiohttp.ClientSession, base: str, delays_ms: Sequence[int], concurrency: int = 20
) -> list[float]:
    """GET ``{base}/sleep/{ms}`` for each of ``delays_ms``, ``concurrency`` at a time;
    every answer must be a 200. Returns the client-side times (s)."""
    sem = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one(ms: int) -> None:
        async with sem:
            t0 = loop.time()
            async with client.get(f"{base}/sleep/{ms}") as r:
                assert r.status == 200
                await r.read()
            times.append(loop.time() - t0)

    await asyncio.gather(*(one(ms) for ms in delays_ms))
    return times


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
        self.llm: list[dict[str, Any]] = []  # /llm streams: when each part was written

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
        r.add_post("/llm/chat/completions", self.llm_chat)
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

    async def llm_chat(self, request: web.Request) -> web.StreamResponse:
        """An OpenAI-compatible chat completion. Streams: a `: ping` and a role-only
        chunk at once, then ``X-Test-TTFT-Ms`` later the first of ``X-Test-Tokens``
        content chunks, ``X-Test-Gap-Ms`` apart, the usage chunk when
        ``stream_options.include_usage`` asks for it, ``[DONE]``. ``X-Test-Shape:
        anthropic`` answers with Messages API events instead. Unary: a body of
        ``X-Test-Body-Kb`` KiB whose usage straddles two writes."""
        body = await request.json()
        h = request.headers
        ttft = float(h.get("X-Test-TTFT-Ms", "200")) / 1000
        gap = float(h.get("X-Test-Gap-Ms", "30")) / 1000
        n = int(h.get("X-Test-Tokens", "10"))
        prompt = len(json.dumps(body.get("messages", [])))  # a deterministic "token" count
        if not body.get("stream"):
            return await self._llm_unary(request, n, prompt, int(h.get("X-Test-Body-Kb", "8")))
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        truth: dict[str, Any] = {"n": n, "prompt": prompt, "writes": [], "arrived": arrived}
        self.llm.append(truth)
        anthropic = h.get("X-Test-Shape") == "anthropic"
        if anthropic:
            start = {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "role": "assistant",
                    "content": [],
                    "usage": {"input_tokens": prompt, "output_tokens": 1},
                },
            }
            await resp.write(b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n")
            await resp.write(
                b'event: content_block_start\ndata: {"type": "content_block_start",'
                b' "index": 0, "content_block": {"type": "text", "text": ""}}\n\n'
            )
            await resp.write(b'event: ping\ndata: {"type": "ping"}\n\n')
        else:
            await resp.write(b": ping\n\n")
            await resp.write(_chunk({"role": "assistant", "content": ""}))
        await asyncio.sleep(ttft)
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            if anthropic:
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"tok{i} "},
                }
                data = b"event: content_block_delta\ndata: " + json.dumps(delta).encode() + b"\n\n"
            else:
                data = _chunk({"content": f"tok{i} "})
            truth["writes"].append(loop.time())
            await resp.write(data)
        if anthropic:
            end = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": n},
            }
            await resp.write(b'event: content_block_stop\ndata: {"type": "content_block_stop"}\n\n')
            await resp.write(b"event: message_delta\ndata: " + json.dumps(end).encode() + b"\n\n")
            await resp.write(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
        else:
            await resp.write(_chunk({}, finish="stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": n,
                    "total_tokens": prompt + n,
                }
                await resp.write(_chunk(None, usage=usage))
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _llm_unary(
        self, request: web.Request, n: int, prompt: int, kb: int
    ) -> web.StreamResponse:
        doc = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "x" * (kb * 1024)}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                      "total_tokens": prompt + n},
            "system_fingerprint": "fp_test",
        }  # fmt: skip
        raw = json.dumps(doc).encode()
        cut = raw.rfind(b'"usage"') + 3  # the key split over two writes
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(raw)
        await resp.prepare(request)
        for part in (raw[: cut - 1000], raw[cut - 1000 : cut], raw[cut:]):
            await resp.write(part)
            await asyncio.sleep(0.005)  # separate reads on the proxy's side
        await resp.write_eof()
        return resp


def _chunk(
    delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                           "model": "m", "choices": [], "usage": usage}  # fmt: skip
    if delta is not None:
        doc["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


async def _serve_forever() -> None:
    """`python -m tests.upstream`: serve on an ephemeral port, print it, run until killed."""
    runner = web.AppRunner(Upstream().app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_forever())
