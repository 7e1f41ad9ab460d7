"""The load: a built-in open-loop aiohttp generator (`--rate N` for `--duration S`) or
the project's locust profile (loadtest/locustfile.py, stages scaled to `--duration`).

Both give exact client-side timings, one `Sample` per request: unary requests to
their last byte, streams to their first body byte (what the sidecar measures too).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"
STREAM = "/v1/chat/completions (stream)"
ENTRIES = (CHAT, EMBED, STREAM)
# entry -> (section of /percentiles, route)
SIDECAR_VIEW = {CHAT: ("routes", CHAT), EMBED: ("routes", EMBED), STREAM: ("streams", CHAT)}
LOCUST_NAMES = {"chat": CHAT, "embeddings": EMBED, "chat stream: first event": STREAM}
MAX_IN_FLIGHT = 2000

CHAT_BODY = {
    "model": "gpt-demo-mini",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Summarise the benefits of a sidecar proxy in one line."},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
}
EMBED_BODY = {"model": "embed-demo-small", "input": ["The quick brown fox."]}


@dataclass(frozen=True)
class Sample:
    t: float  # wall-clock start (time.time())
    entry: str
    ms: float
    ok: bool

    def as_json(self) -> list[Any]:
        return [round(self.t, 4), self.entry, round(self.ms, 3), self.ok]


class RateLoad:
    """Open loop: requests start on schedule whatever the previous ones are doing
    (no coordinated omission); 70% chat, 20% embeddings, 10% streaming chat."""

    def __init__(self, base_url: str, rate: float, duration: float, seed: int = 0) -> None:
        self.base = base_url.rstrip("/")
        self.rate = rate
        self.duration = duration
        self.rng = random.Random(seed)
        self.samples: list[Sample] = []
        self.dropped = 0  # not started: MAX_IN_FLIGHT requests already waiting

    async def _one(self, client: aiohttp.ClientSession, entry: str) -> None:
        t0, start = time.time(), time.perf_counter()
        ok = False
        ms = 0.0
        try:
            if entry == STREAM:
                async with client.post(self.base + CHAT, json={**CHAT_BODY, "stream": True}) as r:
                    await r.content.readany()
                    ms = (time.perf_counter() - start) * 1000
                    await r.read()
                    ok = r.status < 400
            else:
                path, body = (CHAT, CHAT_BODY) if entry == CHAT else (EMBED, EMBED_BODY)
                async with client.post(self.base + path, json=body) as r:
                    await r.read()
                    ok = r.status < 400
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if not ms:
            ms = (time.perf_counter() - start) * 1000
        self.samples.append(Sample(t0, entry, ms, ok))

    def _entry(self) -> str:
        x = self.rng.random()
        return CHAT if x < 0.7 else EMBED if x < 0.9 else STREAM

    async def run(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=120)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            n = int(self.rate * self.duration)
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / self.rate - loop.time()))
                if len(tasks) >= MAX_IN_FLIGHT:
                    self.dropped += 1
                    continue
                task = asyncio.create_task(self._one(client, self._entry()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=120)


def locustfile() -> Path | None:
    """loadtest/locustfile.py of a source checkout (the CWD's, or next to the package),
    when locust is installed."""
    if importlib.util.find_spec("locust") is None:
        return None
    here = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
    for candidate in (Path.cwd() / "loadtest" / "locustfile.py", here):
        if candidate.is_file():
            return candidate
    return None


async def run_locust(
    file: Path, base_url: str, duration: float, run_dir: Path
) -> tuple[list[Sample], int]:
    """The staged locust profile (smoke, stages of duration / 4.5 s); returns the
    samples of its request log and locust's exit status (its gate is switched off:
    `analyze` judges)."""
    requests_file = run_dir / "locust-requests.jsonl"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(file), "--headless", "--host", base_url,
        "--load-profile", "smoke", "--stage-seconds", f"{duration / 4.5:.3f}",
        "--p95-ms", "1e9", "--max-error-rate", "1", "--only-summary", "--loglevel", "ERROR",
        "--html", str(run_dir / "locust.html"), "--requests-file", str(requests_file),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode not in (0, 1):
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"locust failed (exit {proc.returncode}): {tail}")
    samples: list[Sample] = []
    with contextlib.suppress(FileNotFoundError), requests_file.open() as fh:
        for line in fh:
            row = json.loads(line)
            entry = LOCUST_NAMES.get(row["name"])
            if entry is not None:
                samples.append(Sample(row["t"], entry, row["ms"], row["ok"]))
    return samples, proc.returncode or 0
