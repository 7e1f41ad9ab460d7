"""`/metrics` and memory stay bounded whatever paths clients send (issue 10, defect 2:
100 distinct ~8 KB paths grew `/metrics` to 170 MB and RSS by 180 MiB)."""

from __future__ import annotations

import asyncio
import string

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import SERIES_MAX, Metrics, RequestMetrics
from sidecar.record import TimingRecord

from .process import spawn_sidecar
from .rawhttp import raw_request


def _junk_path(i: int) -> str:
    """~8 KB, no digit (so no segment looks like an id), distinct from its first chars."""
    letters = string.ascii_lowercase
    head = letters[i % 26] + letters[i // 26 % 26] + letters[i // 676 % 26]
    return f"/{head}-" + "q" * 8100


async def _rss(client: aiohttp.ClientSession, admin: str) -> int:
    async with client.get(f"{admin}/stats") as r:
        return int((await r.json())["sidecar"]["rss_bytes"])


METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("methods", "max_metrics_bytes"),
    [
        (METHODS[:1], 1_500_000),  # the case: 800 GETs over 100 paths
        (METHODS, 5_000_000),  # worst case: each path with 8 methods (8 series each)
    ],
    ids=["get", "eight-methods"],
)
async def test_long_distinct_paths_keep_metrics_and_rss_bounded(
    upstream, methods, max_metrics_bytes
):
    _, url = upstream
    sc = await spawn_sidecar(url)
    async with aiohttp.ClientSession() as client:
        for i in range(20):  # warm-up: code paths, allocator
            async with client.get(f"{sc.base}/echo/warm{i}") as r:
                await r.read()
        rss_before = await _rss(client, sc.admin)
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> None:
            method = methods[i // 100 % len(methods)]
            request = f"{method} {_junk_path(i % 100)} HTTP/1.1\r\nHost: gw\r\n"
            async with sem:
                answer = await raw_request(sc.port, f"{request}Connection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 4"), answer[:80]

        await asyncio.gather(*(one(i) for i in range(800)))
        async with client.get(f"{sc.admin}/metrics") as r:
            body = await r.read()
        rss_after = await _rss(client, sc.admin)
    sc.terminate()
    assert await sc.wait() == 0
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(body.decode())
        if f.name == "sidecar_request_duration_seconds"
        for s in f.samples
    }
    print(
        f"/metrics {len(body)} bytes, {len(routes)} routes; "
        f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert max(len(r) for r in routes) <= 128
    assert len(routes) <= 100 + 1  # SIDECAR_MAX_ROUTES, plus "other"
    assert len(body) < max_metrics_bytes
    assert rss_after - rss_before < 30 * 2**20


def _record(route: str, method: str = "GET", status: int = 200) -> TimingRecord:
    return TimingRecord(
        0.0, 0.001, 0.002, 0.003, 0.003, 0.004, 0.0, method, route, status, 0, 10,
        False, "rid", None, None, 0.004,
    )  # fmt: skip


def test_series_per_family_are_capped_and_overflow_counted():
    metrics = Metrics([0.1, 1.0])
    observer = RequestMetrics(metrics)
    for status in (0, 42, 1000, 65535):  # not HTTP statuses: code="other"
        observer.observe(_record("/r0", status=status))
    for i in range(SERIES_MAX + 500):
        observer.observe(_record(f"/r{i}", status=200 + i % 3))
    assert len(metrics.request_duration) <= SERIES_MAX + 100 + 3
    assert len(metrics.upstream_header) <= SERIES_MAX + 1
    codes = {values[2] for values in metrics.request_duration._series}
    assert codes <= {"200", "201", "202", "other"}
    overflow = metrics.registry.get_sample_value(
        "sidecar_metric_series_overflow_total", {"metric": "sidecar_request_duration_seconds"}
    )
    # the cap counts distinct (route, method, status, stream): the four statuses above
    # took four of its places (one series, code="other"), so 4 + 500 folded
    assert overflow == 504
