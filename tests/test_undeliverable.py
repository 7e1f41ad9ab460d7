"""One event a sink cannot encode never blocks it; a dead sink does not hold up
shutdown (issue 10, SPEC "Hostile input"). Real redis-server, real sidecar processes."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

import aiohttp
import pytest
from aiohttp import web

from sidecar.events import BREACH, RESOLVED, Event
from sidecar.metrics import Metrics
from sidecar.sinks.alertmanager import AlertmanagerSink

from .conftest import serve_app
from .process import spawn_sidecar
from .rawhttp import raw_request
from .test_events import _queue_empty, stream_entries, synthetic, wait_until


async def _sidecar(upstream_url, redis_url):
    """Every request slower than 20 ms raises an event; 20 s of grace on SIGTERM."""
    return await spawn_sidecar(
        upstream_url, SIDECAR_REDIS_URL=redis_url, SIDECAR_SLOW_REQUEST_MS="20",
        SIDECAR_SHUTDOWN_GRACE_S="20",
    )  # fmt: skip


async def _request_ids(url):
    return [f.get("request_id") for _, f in await stream_entries(url)]


@pytest.mark.tools
async def test_non_utf8_request_id_does_not_stop_event_delivery(upstream, redis_server):
    """`X-Request-Id: bad\\xff\\xfe` on a slow request used to yield an event redis-py
    could not encode; the sink retried it forever and every later event waited."""
    _, url = upstream
    sc = await _sidecar(url, redis_server.url)
    answer = await raw_request(
        sc.port,
        b"GET /sleep/60 HTTP/1.1\r\nHost: gw\r\nX-Request-Id: bad\xff\xfe\xe2\x80\xae\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{sc.base}/sleep/60", headers={"X-Request-Id": "after"}) as r,
    ):
        assert r.status == 200

    async def after_arrived():
        return "after" in await _request_ids(redis_server.url)

    await wait_until(after_arrived, timeout=10)
    ids = await _request_ids(redis_server.url)
    # sanitised where it entered the event: the raw bytes shown, nothing to the terminal
    assert ids == ["bad\\xff\\xfe\\u202e", "after"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sc.terminate()
    assert await sc.wait(15) == 0
    assert loop.time() - t0 < 5
    assert b"Traceback" not in sc.stderr


async def test_unencodable_event_is_dropped_and_the_batch_goes_on(
    upstream, make_sidecar, redis_server, caplog
):
    """Whatever reaches a sink: an event it cannot encode is dropped and counted, the
    rest of its batch (one Redis pipeline) is delivered, in order."""
    _, url = upstream
    redis_server.kill()  # let the queue fill so all events go in one batch
    sc = await make_sidecar(url, redis_url=redis_server.url)
    events = [synthetic(i) for i in range(5)]
    events[2] = bad = dataclasses.replace(events[2], request_id="raw\udcffbyte")
    for event in events:
        sc.bus.publish(event)
    redis_server.start()

    async def idle():
        return all(len(sink) == 0 for sink in sc.bus.sinks if sink.name == "redis")

    await wait_until(idle, timeout=30)
    assert await _request_ids(redis_server.url) == ["seq-0", "seq-1", "seq-3", "seq-4"]
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r,
    ):
        text = await r.text()
    assert 'sidecar_event_deliveries_total{result="dropped",sink="redis"} 1.0' in text
    assert 'sidecar_event_deliveries_total{result="ok",sink="redis"} 4.0' in text
    (line,) = [r.getMessage() for r in caplog.records if "undeliverable" in r.getMessage()]
    assert bad.event_id in line and line.isprintable()
    sc.bus.publish(synthetic(9))  # and the sink still works
    await wait_until(idle, timeout=10)
    assert (await _request_ids(redis_server.url))[-1] == "seq-9"


@pytest.mark.tools
@pytest.mark.slow
async def test_sigterm_with_redis_dead_exits_early_counting_what_is_lost(upstream, redis_server):
    """Redis dead: SIGTERM used to wait the whole grace period (20 s) for a sink that
    could not come back. Now the flush stops once the sink has failed for 5 s and
    logs how many events it drops."""
    _, url = upstream
    sc = await _sidecar(url, redis_server.url)
    redis_server.kill()
    async with aiohttp.ClientSession() as client:
        for i in range(3):
            async with client.get(f"{sc.base}/sleep/40", headers={"X-Request-Id": f"l{i}"}):
                pass
    await sc.wait_for_metric('sidecar_event_queue_depth{sink="redis"} 3.0')  # queued
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sc.terminate()
    assert await sc.wait(18) == 0
    took = loop.time() - t0
    assert took < 10, f"exit took {took:.1f}s with a 20 s grace period"
    log = sc.stderr.decode()
    assert re.search(r"redis: 3 events dropped at exit \(sink failing for \d+\.\ds\)", log), log
    assert "Traceback" not in log


class Refuser:
    """A receiver that answers each POST with the next status of ``statuses`` (then
    204), with a redirect to ``/elsewhere`` and a hostile body; records what it got."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.got: list[str] = []
        self.elsewhere = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append(await request.text())
        status = self.statuses.pop(0) if self.statuses else 204
        headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
        return web.Response(status=status, headers=headers, text="no\x1b[2J\n" * 50_000)

    async def redirected(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/api/v2/alerts", self.handle)
        app.router.add_route("*", "/elsewhere", self.redirected)
        return app


def _breach(i: int) -> Event:
    return dataclasses.replace(synthetic(i), type=BREACH, severity="warning", quantile="p95",
                               window_s=60, samples=100)  # fmt: skip


@pytest.mark.parametrize("sink", ["webhook", "alertmanager"])
@pytest.mark.parametrize("status", [302, 307, 400, 404])
async def test_a_refused_or_redirected_event_is_dropped_not_delivered(
    upstream, make_sidecar, sink, status, caplog
):
    """A redirect is not followed (events go only to the configured URL) and, like a
    4xx, is not a delivery: the event is counted as dropped, logged without the
    receiver's control bytes, and the next event goes on."""
    _, url = upstream
    rx = Refuser(status)
    async with serve_app(rx.app()) as base:
        where = {"webhook_urls": f"{base}/hook"} if sink == "webhook" else {
            "alertmanager_url": base}  # fmt: skip
        sc = await make_sidecar(url, **where)
        sc.bus.publish(_breach(1))
        await wait_until(lambda: _queue_empty(sc, sink))
        sc.bus.publish(_breach(2))
        await wait_until(lambda: _queue_empty(sc, sink))
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r,
        ):
            text = await r.text()
    got = [("1001" in body, "1002" in body) for body in rx.got]  # their value_ms
    assert got == [(True, False), (False, True)]
    assert rx.elsewhere == 0
    assert f'sidecar_event_deliveries_total{{result="dropped",sink="{sink}"}} 1.0' in text
    assert f'sidecar_event_deliveries_total{{result="ok",sink="{sink}"}} 1.0' in text
    (line,) = [r.getMessage() for r in caplog.records if "undeliverable" in r.getMessage()]
    assert f"HTTP {status}" in line and line.isprintable()


async def test_alertmanager_stops_re_sending_what_it_refuses():
    """A firing alert is re-sent until resolved; once Alertmanager refuses it (401,
    a redirect to a login page...), re-sending stops instead of repeating for ever."""
    rx = Refuser(200, 401)  # taken, then refused on its first re-send
    async with serve_app(rx.app()) as base:
        sink = AlertmanagerSink(base, capacity=10, metrics=Metrics([0.1]), resend_s=0.05)
        async with sink:
            sink.enqueue(_breach(1))
            await wait_until(lambda: _n(len(rx.got) >= 2))
            assert not sink.firing
            posts = len(rx.got)
            sink.enqueue(_breach(2))  # a newer breach is sent, and re-sent again
            await wait_until(lambda: _n(len(rx.got) >= posts + 3))
    assert ["1001" in body for body in rx.got[:2]] == [True, True]
    assert all("1002" in body for body in rx.got[posts:])


async def _n(value: bool) -> bool:
    return value


async def test_one_alert_alertmanager_refuses_does_not_drop_its_batch(alertmanager):
    """A real Alertmanager answers 400 to an array holding one invalid alert (here a
    resolve that ends before it starts): only that alert is dropped and counted; the
    others are delivered and stay firing (re-sent until resolved)."""
    metrics = Metrics([0.1])
    sink = AlertmanagerSink(alertmanager, capacity=10, metrics=metrics)
    good = [dataclasses.replace(_breach(i), route=f"/r{i}") for i in (1, 3)]
    bad = dataclasses.replace(_breach(2), type=RESOLVED, route="/r2", started_at=time.time() + 60)
    for event in (good[0], bad, good[1]):
        sink.enqueue(event)  # queued before the sink runs: one batch of three
    async with sink:
        await wait_until(lambda: _n(len(sink) == 0))

    def count(result: str) -> float | None:
        return metrics.registry.get_sample_value(
            "sidecar_event_deliveries_total", {"sink": "alertmanager", "result": result}
        )  # fmt: skip

    assert (count("ok"), count("dropped")) == (2.0, 1.0)
    assert set(sink.firing) == {e.rule_key for e in good}
    async with aiohttp.ClientSession() as client, client.get(f"{alertmanager}/api/v2/alerts") as r:
        routes = {a["labels"]["route"] for a in await r.json()}
    assert routes == {"/r1", "/r3"}
