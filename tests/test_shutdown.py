"""SIGTERM drain in a real subprocess (SPEC "Proxy behaviour")."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from .process import spawn_sidecar


async def test_sigterm_drains_in_flight_then_exits_0(upstream):
    up, url = upstream
    up.expect_arrivals = 3
    sc = await spawn_sidecar(url, SIDECAR_SHUTDOWN_GRACE_S="10")
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{sc.admin}/readyz") as r:
            assert r.status == 200
        in_flight = [asyncio.create_task(client.get(f"{sc.base}/hold")) for _ in range(3)]
        await asyncio.wait_for(up.arrived_event.wait(), 10)

        sc.terminate()
        # readiness flips at once, while the requests are still held upstream
        async with asyncio.timeout(5):
            while True:
                async with client.get(f"{sc.admin}/readyz") as r:
                    if r.status == 503:
                        assert (await r.json())["status"] == "draining"
                        break
        assert sc.proc.returncode is None  # still serving the in-flight requests

        up.release.set()
        responses = await asyncio.gather(*in_flight)
        assert [r.status for r in responses] == [200, 200, 200]
        for r in responses:
            assert (await r.json()) == {"held": True}

    assert await sc.wait(15) == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as client:
            await client.get(f"{sc.base}/echo")


async def test_grace_period_bounds_the_drain(upstream):
    up, url = upstream
    up.expect_arrivals = 1
    sc = await spawn_sidecar(url, SIDECAR_SHUTDOWN_GRACE_S="0.5")
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as client:
        held = asyncio.create_task(client.get(f"{sc.base}/hold"))
        await asyncio.wait_for(up.arrived_event.wait(), 10)
        t0 = loop.time()
        sc.terminate()
        assert await sc.wait(10) == 0
        assert loop.time() - t0 < 5
        with pytest.raises(aiohttp.ClientError):
            await held
    up.release.set()


async def test_sigterm_flushes_pending_events(upstream, redis_server):
    """An event queued while Redis hangs is delivered during the drain, then exit 0."""
    import redis.asyncio as aioredis

    _, url = upstream
    sc = await spawn_sidecar(
        url, SIDECAR_REDIS_URL=redis_server.url, SIDECAR_SLOW_REQUEST_MS="20",
        SIDECAR_SHUTDOWN_GRACE_S="10",
    )  # fmt: skip
    redis_server.pause()
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{sc.base}/sleep/40", headers={"X-Request-Id": "flush-me"}) as r,
    ):
        assert r.status == 200
    await sc.wait_for_metric('sidecar_event_queue_depth{sink="redis"} 1.0')  # queued
    sc.terminate()
    redis_server.resume()
    assert await sc.wait(20) == 0
    rclient = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        entries: Any = await rclient.xrange("sidecar:events")
    finally:
        await rclient.aclose()
    assert [f["request_id"] for _, f in entries] == ["flush-me"]
