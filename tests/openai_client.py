"""The official `openai` client in a process of its own, as a real client is:
``python -m tests.openai_client BASE_URL PLAN_JSON`` runs the plan's calls and prints
one JSON line per call. Its CPU (start-up, pydantic parsing) never holds the event
loop of the sidecar under test, whose lag the latency anatomy measures.

A plan is a list of steps ``{"stream": bool, "include_usage": bool, "headers": {...},
"concurrency": N}``; each step runs its N calls at once, steps run in order. A stream
reports the seconds to its first content chunk as the client saw them and its usage.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionUserMessageParam

MESSAGES: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": "Say hello."}]


async def _call(client: AsyncOpenAI, step: dict[str, Any]) -> dict[str, Any]:
    headers = step.get("headers", {})
    t0 = time.perf_counter()
    if not step.get("stream"):
        answer = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            extra_headers=headers,
        )
        usage = answer.usage
        return {"usage": None if usage is None else usage.model_dump()}
    extra: dict[str, Any] = {}
    if step.get("include_usage"):
        extra["stream_options"] = {"include_usage": True}
    stream = await client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
        extra_headers=headers,
        **extra,
    )
    assert isinstance(stream, AsyncStream)
    first = None
    usage_doc = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            usage_doc = chunk.usage.model_dump()
    return {"ttft": first, "usage": usage_doc}


async def main(base: str, plan: list[dict[str, Any]]) -> None:
    client = AsyncOpenAI(base_url=base, api_key="sk-dummy", max_retries=0)
    try:
        for step in plan:
            n = int(step.get("concurrency", 1))
            for result in await asyncio.gather(*(_call(client, step) for _ in range(n))):
                print(json.dumps(result), flush=True)
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
