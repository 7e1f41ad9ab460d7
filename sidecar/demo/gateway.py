"""A demo AI gateway with OpenAI-like routes and realistic latency.

Latencies are lognormal with a small slow tail (1% of requests 3-6x slower); 1% of
requests fail. Streaming chat answers token by token over SSE, its first token after
a "time to first token". Calm, every route's p95 stays under 100 ms and p99 under
250 ms (the sidecar's default thresholds). With a `Schedule` (`latency-sidecar demo`
uses one) chat slows down for a while every cycle, as when the GPUs are busy.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

MODELS = ["gpt-demo-mini", "gpt-demo-large", "embed-demo-small"]


def _lognormal_s(rng: random.Random, median_ms: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(median_ms / 1000), sigma)


@dataclass(frozen=True)
class Schedule:
    """Chat (unary and time to first token) is `factor` times slower from `slow_from_s`
    to `slow_to_s` of every `cycle_s` seconds, counted from the gateway's first request
    (in a compose stack the traffic starts once everything is healthy: the first slow
    phase then comes 5 s into it, not a minute later)."""

    cycle_s: float = 60.0
    slow_from_s: float = 5.0
    slow_to_s: float = 15.0
    factor: float = 5.0

    def factor_at(self, elapsed_s: float) -> float:
        in_cycle = elapsed_s % self.cycle_s
        return self.factor if self.slow_from_s <= in_cycle < self.slow_to_s else 1.0


class DemoGateway:
    def __init__(
        self,
        seed: int | None = None,
        error_rate: float = 0.01,
        schedule: Schedule | None = None,
        extra_delay_s: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.error_rate = error_rate
        self.schedule = schedule
        self.started: float | None = None  # the first request's time (`slowdown`)
        self.extra_delay_s = extra_delay_s  # a slower upstream, to try regression gates

    def slowdown(self) -> float:
        """How much slower chat is right now (1.0 without a schedule)."""
        if self.schedule is None:
            return 1.0
        now = time.monotonic()
        if self.started is None:
            self.started = now
        return self.schedule.factor_at(now - self.started)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _delay(self, median_ms: float, sigma: float) -> float:
        delay = _lognormal_s(self.rng, median_ms, sigma)
        if self.rng.random() < 0.01:  # the slow tail: cold cache, long prompt
            delay *= self.rng.uniform(3, 6)
        return delay + self.extra_delay_s

    def _maybe_fail(self) -> web.Response | None:
        if self.rng.random() < self.error_rate:
            status = self.rng.choice([500, 502, 503, 429])
            return web.json_response(
                {"error": {"message": "demo failure", "type": "server_error"}}, status=status
            )
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        model = body.get("model", MODELS[0])
        if body.get("stream"):
            options = body.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await self._chat_stream(request, model, usage)
        await asyncio.sleep(self._delay(35, 0.3) * self.slowdown())
        if (failure := self._maybe_fail()) is not None:
            return failure
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello from the demo."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
            }
        )

    async def _chat_stream(
        self, request: web.Request, model: str, include_usage: bool
    ) -> web.StreamResponse:
        """Like a real gateway: headers, a `: ping` keep-alive and the role-only chunk at
        once, the first token after a "time to first token", the usage chunk last when
        ``stream_options.include_usage`` asks for it."""
        ttft = self._delay(30, 0.3) * self.slowdown()
        if (failure := self._maybe_fail()) is not None:
            await asyncio.sleep(ttft)
            return failure
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        words = ["Streaming", "tokens", "one", "by", "one", "from", "the", "demo", "gateway"]

        def chunk(
            delta: dict[str, str] | None, finish: str | None = None, usage: object = None
        ) -> bytes:
            choices = [] if delta is None else [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}]  # fmt: skip
            doc: dict[str, object] = {"id": cid, "object": "chat.completion.chunk",
                                      "model": model, "choices": choices}  # fmt: skip
            if include_usage:  # null in every chunk but the last, as OpenAI sends it
                doc["usage"] = usage
            return f"data: {json.dumps(doc)}\n\n".encode()

        try:
            await resp.prepare(request)
            await resp.write(b": ping\n\n")
            await resp.write(chunk({"role": "assistant", "content": ""}))
            await asyncio.sleep(ttft)  # time to first token
            n = self.rng.randint(8, 24)
            for i in range(n):
                await resp.write(chunk({"content": words[i % len(words)] + " "}))
                await asyncio.sleep(_lognormal_s(self.rng, 15, 0.3))
            await resp.write(chunk({}, finish="stop"))
            if include_usage:
                usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
                await resp.write(chunk(None, usage=usage))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away: nothing to finish
            pass
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(self._delay(25, 0.35))
        if (failure := self._maybe_fail()) is not None:
            return failure
        vector = [round(self.rng.uniform(-1, 1), 4) for _ in range(16)]
        return web.json_response(
            {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}]}
        )

    async def models(self, _: web.Request) -> web.Response:
        await asyncio.sleep(self._delay(3, 0.3))
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}
        )

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in MODELS:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        return web.json_response({"id": name, "object": "model"})


async def serve_gateway(
    host: str,
    port: int,
    seed: int | None = None,
    schedule: Schedule | None = None,
    extra_delay_s: float = 0.0,
) -> web.AppRunner:
    gateway = DemoGateway(seed, schedule=schedule, extra_delay_s=extra_delay_s)
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
