"""What is captured from the sidecar while the load runs: `/stats`, `/percentiles` and
the sums and counts of its histograms (`/metrics`) every interval, a CPU profile and a
block profile of the whole load (at most 60 s each, the profiling listener's limit)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .target import Target

MAX_PROFILE_S = 60
BLOCK_THRESHOLD_MS = 20
# histogram families whose per-route sum and count are kept: mean overhead and latency
SUMMED = {
    "sidecar_overhead_seconds": "overhead",
    "sidecar_request_duration_seconds": "duration",
    "sidecar_upstream_header_seconds": "upstream",
}


def histogram_sums(families: Iterable[Any]) -> dict[str, dict[str, list[float]]]:
    """{kind: {route or "route (stream)": [sum_s, count]}} from parsed exposition."""
    out: dict[str, dict[str, list[float]]] = {k: {} for k in SUMMED.values()}
    for fam in families:
        kind = SUMMED.get(fam.name)
        if kind is None:
            continue
        for s in fam.samples:
            if not s.name.endswith(("_sum", "_count")):
                continue
            route = s.labels.get("route", "")
            if s.labels.get("stream") == "true":
                route += " (stream)"
            acc = out[kind].setdefault(route, [0.0, 0.0])
            acc[0 if s.name.endswith("_sum") else 1] += s.value
    return out


@dataclass
class Capture:
    interval: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    cpu_folded: str = ""
    block: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


ANSWER_MAX = 64 * 2**20  # of any one answer from the target (a /metrics of 100 routes: ~1 MiB)


async def _body(r: aiohttp.ClientResponse) -> str:
    """The answer's text, refused past `ANSWER_MAX` (the target may be hostile)."""
    data = await r.content.read(ANSWER_MAX + 1)
    if len(data) > ANSWER_MAX:
        raise ValueError(f"an answer of {r.url.path} over {ANSWER_MAX >> 20} MiB")
    return data.decode("utf-8", "replace")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # nested beyond reason: not an answer of ours
        raise ValueError("JSON nested too deep") from None


async def _get_json(client: aiohttp.ClientSession, url: str) -> Any:
    async with client.get(url) as r:
        r.raise_for_status()
        return _json(await _body(r))


async def _sample(client: aiohttp.ClientSession, target: Target) -> dict[str, Any]:
    stats, pct = await asyncio.gather(
        _get_json(client, target.admin_url + "/stats"),
        _get_json(client, target.admin_url + "/percentiles"),
    )
    async with client.get(target.admin_url + "/metrics") as r:
        text = await _body(r)
    return {
        "t": time.time(),
        "stats": stats,
        "percentiles": pct,
        "sums": histogram_sums(text_string_to_metric_families(text)),
    }


async def sample_loop(
    client: aiohttp.ClientSession, target: Target, cap: Capture, stop: asyncio.Event
) -> None:
    failures = 0
    while True:
        try:
            cap.samples.append(await _sample(client, target))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            failures += 1
            if failures == 1:
                cap.notes.append(f"admin listener: a sample failed ({exc!r}); kept going")
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), cap.interval)


async def profiles(
    client: aiohttp.ClientSession, target: Target, cap: Capture, seconds: float
) -> None:
    if not target.profiling_url:
        cap.notes.append("no profiling URL: CPU and block profiles skipped")
        return
    seconds = max(1.0, min(MAX_PROFILE_S, seconds))
    auth = {"Authorization": f"Bearer {target.token}"}
    base = target.profiling_url + "/debug/pprof"
    timeout = aiohttp.ClientTimeout(total=seconds + 60)

    async def cpu() -> None:
        url = f"{base}/cpu?seconds={seconds:g}&format=collapsed"
        async with client.get(url, headers=auth, timeout=timeout) as r:
            if r.status != 200:
                cap.notes.append(f"CPU profile: HTTP {r.status} {(await _body(r))[:200]!r}")
                return
            cap.cpu_folded = await _body(r)

    async def block() -> None:
        url = f"{base}/block?seconds={seconds:g}&threshold_ms={BLOCK_THRESHOLD_MS}&format=json"
        async with client.get(url, headers=auth, timeout=timeout) as r:
            if r.status != 200:
                cap.notes.append(f"block profile: HTTP {r.status} {(await _body(r))[:200]!r}")
                return
            block = _json(await _body(r))
            cap.block = block if isinstance(block, dict) else None

    try:
        await asyncio.gather(cpu(), block())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        cap.notes.append(f"profiling listener: {exc!r}")
