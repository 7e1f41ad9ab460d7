"""Percentiles and metrics end to end through the real proxy (issue 3)."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .exact import max_bound_ms, sandwich_ms

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def admin_get(client, sc, path, **kw):
    async with client.get(f"http://127.0.0.1:{sc.admin_port}{path}", **kw) as r:
        assert r.status == 200, await r.text()
        return r, await r.read()


async def test_percentiles_agree_with_client_side_exact_percentiles(proxied):
    up, sc, _, client, base = proxied
    rng = random.Random(7)
    delays = [20] * 60 + [60] * 30 + [150] * 10
    rng.shuffle(delays)
    loop = asyncio.get_running_loop()
    client_times = []

    async def one(ms):
        t0 = loop.time()
        async with client.get(f"{base}/sleep/{ms}") as r:
            await r.read()
        client_times.append(loop.time() - t0)

    for batch in range(0, len(delays), 20):
        await asyncio.gather(*(one(ms) for ms in delays[batch : batch + 20]))
    sc.percentiles.tick()
    _, body = await admin_get(client, sc, "/percentiles")
    import json

    doc = json.loads(body)
    stats = doc["routes"]["/sleep/{id}"]["60"]
    assert stats["count"] == len(delays)
    assert doc["routes"]["*"]["60"]["count"] == len(delays)
    for key, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        low, high = sandwich_ms(up.durations, client_times, q)
        assert low <= stats[key] <= high, (key, low, stats[key], high)
    assert stats["max_ms"] <= max_bound_ms(client_times)  # as the quantiles


async def test_streams_are_measured_by_first_byte(proxied):
    _, sc, records, client, base = proxied
    for _ in range(3):
        async with client.get(f"{base}/slow-stream/300") as r:
            assert (await r.read()).endswith(b"[DONE]\n\n")
    sc.percentiles.tick()
    _, body = await admin_get(client, sc, "/percentiles")
    import json

    doc = json.loads(body)
    stream = doc["streams"]["/slow-stream/{id}"]["60"]
    assert stream["count"] == 3
    assert stream["max_ms"] < 250, "a stream's latency is its time to first byte"
    assert "/slow-stream/{id}" not in doc["routes"], "unary and streams never mix"
    _, text = await admin_get(client, sc, "/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    durations = [
        s for s in fams["sidecar_stream_duration_seconds"].samples if s.name.endswith("_sum")
    ]
    assert durations and durations[0].value >= 0.9  # 3 x >= 300 ms
    ttfb = [
        s
        for s in fams["sidecar_request_duration_seconds"].samples
        if s.name.endswith("_sum") and s.labels["stream"] == "true"
    ]
    assert ttfb and ttfb[0].value < 0.75


async def test_cardinality_cap_gives_other(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url, max_routes=2)
    async with aiohttp.ClientSession() as client:
        for path in ("/echo/a", "/echo/b", "/echo/c", "/echo/d"):
            async with client.get(f"http://127.0.0.1:{sc.proxy_port}{path}") as r:
                assert r.status == 200
        sc.percentiles.tick()
        _, body = await admin_get(client, sc, "/percentiles")
        import json

        routes = json.loads(body)["routes"]
        assert set(routes) == {"/echo/a", "/echo/b", "other", "*"}
        assert routes["other"]["60"]["count"] == 2
        _, text = await admin_get(client, sc, "/metrics")
    labels = {
        s.labels["route"]
        for f in text_string_to_metric_families(text.decode())
        if f.name == "sidecar_request_duration_seconds"
        for s in f.samples
    }
    assert labels == {"/echo/a", "/echo/b", "other"}


@pytest.mark.tools  # promtool
async def test_metrics_exposition_parses_and_passes_promtool(proxied, make_sidecar, closed_port):
    up, sc, _, client, base = proxied
    for path in ("/echo/1", "/sleep/5", "/status/500", "/slow-stream/1"):
        async with client.get(f"{base}{path}", headers={"traceparent": TRACEPARENT}) as r:
            await r.read()
    dead = await make_sidecar(f"http://127.0.0.1:{closed_port}")  # connections refused
    async with client.get(f"http://127.0.0.1:{dead.proxy_port}/x") as r:
        assert r.status == 502
    sc.percentiles.tick()
    resp, text = await admin_get(client, sc, "/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for name in (
        "sidecar_request_duration_seconds",
        "sidecar_upstream_header_seconds",
        "sidecar_overhead_seconds",
        "sidecar_stream_duration_seconds",
        "sidecar_requests_in_flight",
        "sidecar_latency_rolling_seconds",
        "process_resident_memory_bytes",
        "python_gc_collections",
    ):
        assert name in fams, name
    assert fams["sidecar_request_duration_seconds"].type == "histogram"
    rolling = fams["sidecar_latency_rolling_seconds"]
    assert rolling.type == "summary"
    q = {
        (s.labels["route"], s.labels["window"], s.labels["quantile"], s.labels["stream"])
        for s in rolling.samples
        if s.name == "sidecar_latency_rolling_seconds"
    }
    assert ("/echo/{id}", "60s", "0.99", "false") in q
    assert ("*", "300s", "0.5", "false") in q
    # _count and _sum: cumulative, the same for every window of a (route, stream)
    totals = {
        (s.name, s.labels["route"], s.labels["stream"], s.labels["window"]): s.value
        for s in rolling.samples
        if s.name != "sidecar_latency_rolling_seconds"
    }
    for window in ("60s", "300s"):
        assert totals[("sidecar_latency_rolling_seconds_count", "*", "false", window)] == 3
        assert (
            totals[("sidecar_latency_rolling_seconds_count", "/sleep/{id}", "false", window)] == 1
        )
        assert (
            totals[("sidecar_latency_rolling_seconds_sum", "/sleep/{id}", "false", window)] >= 0.005
        )
    codes = {
        s.labels["code"]
        for s in fams["sidecar_request_duration_seconds"].samples
        if "code" in s.labels
    }
    assert {"200", "500"} <= codes

    _, dead_text = await admin_get(client, dead, "/metrics")
    errs = [
        s
        for f in text_string_to_metric_families(dead_text.decode())
        if f.name == "sidecar_upstream_errors"
        for s in f.samples
    ]
    assert [(s.labels["kind"], s.value) for s in errs] == [("connect", 1.0)]

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: .ci/run installs the Debian prometheus package"
    for body in (text, dead_text):
        out = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
        )
        assert out.returncode == 0 and not out.stdout + out.stderr, out


async def test_openmetrics_has_trace_exemplars(proxied):
    _, sc, _, client, base = proxied
    async with client.get(f"{base}/echo/1", headers={"traceparent": TRACEPARENT}) as r:
        await r.read()
    resp, text = await admin_get(
        client, sc, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    body = text.decode()
    assert body.rstrip().endswith("# EOF")
    lines = [
        line
        for line in body.splitlines()
        if line.startswith("sidecar_request_duration_seconds_bucket") and "# {" in line
    ]
    assert lines and 'trace_id="0af7651916cd43dd8448eb211c80319c"' in lines[0]
