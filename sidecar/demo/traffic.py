"""Demo traffic: 70% chat, 20% embeddings, 10% streaming chat, Poisson arrivals."""

from __future__ import annotations

import asyncio
import random

import aiohttp

CHAT = {"model": "gpt-demo-mini", "messages": [{"role": "user", "content": "Say hello."}]}
EMBED = {"model": "embed-demo-small", "input": "The quick brown fox"}


class Traffic:
    def __init__(self, base_url: str, rps: float = 40, seed: int | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.rps = rps
        self.rng = random.Random(seed)
        self.sent = 0
        self.failed = 0
        self._inflight: set[asyncio.Task[None]] = set()

    async def _one(self, session: aiohttp.ClientSession) -> None:
        pick = self.rng.random()
        try:
            if pick < 0.7:
                async with session.post(f"{self.base}/v1/chat/completions", json=CHAT) as r:
                    await r.read()
            elif pick < 0.9:
                async with session.post(f"{self.base}/v1/embeddings", json=EMBED) as r:
                    await r.read()
            else:
                body: dict[str, object] = {**CHAT, "stream": True}
                if self.rng.random() < 0.5:  # usage in a last chunk, as OpenAI's API offers
                    body["stream_options"] = {"include_usage": True}
                async with session.post(f"{self.base}/v1/chat/completions", json=body) as r:
                    async for _ in r.content:  # read the stream to its end
                        pass
            if r.status >= 500:
                self.failed += 1
        except aiohttp.ClientError:
            self.failed += 1

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while True:
                    await asyncio.sleep(self.rng.expovariate(self.rps))
                    if len(self._inflight) >= 500:  # bounded: never pile up unboundedly
                        continue
                    self.sent += 1
                    task = asyncio.create_task(self._one(session))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            finally:
                for task in list(self._inflight):
                    task.cancel()
                await asyncio.gather(*self._inflight, return_exceptions=True)
