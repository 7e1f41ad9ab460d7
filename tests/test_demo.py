"""`latency-sidecar demo` runs, shows all three kinds of traffic, exits 0 (issue 3), and
tells the whole story within half a minute: breaches raised, then resolved (issue 10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sidecar.demo.gateway import DemoGateway, Schedule
from sidecar.demo.table import ErrorCounter, breach_names
from sidecar.record import TimingRecord


def run_demo(duration: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    argv = [sys.executable, "-m", "sidecar", "demo", "--duration", str(duration)]
    argv += ["--refresh", "1", "--rps", "60"]
    argv += ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out


def test_demo_runs_and_exits_cleanly():
    out = run_demo(4)
    last = out.stdout.rsplit("last 10s window", 1)[1]
    rows = {tuple(line.split()[:2]) for line in last.splitlines() if line.startswith("/")}
    assert ("/v1/chat/completions", "unary") in rows
    assert ("/v1/embeddings", "unary") in rows
    assert ("/v1/chat/completions", "stream") in rows
    # streams show their time to first token and per output token (the demo gateway
    # sends a ping and a role chunk first: TTFT is later than the first byte)
    (stream,) = [
        line.split()
        for line in last.splitlines()
        if line.startswith("/v1/chat/completions  ") and " stream " in line
    ]
    ttft, tpot = float(stream[-2]), float(stream[-1])
    assert ttft > 0 and tpot > 0, stream
    assert "admin" in out.stdout and "/percentiles" in out.stdout
    assert "demo finished" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_shows_breaches_raised_then_resolved_within_30s():
    """The README promises: chat slows down from 5 s to 15 s, breaches within seconds,
    all resolved about 10 s after the slowdown ends."""
    out = run_demo(30)
    frames = out.stdout.split("last 10s window")[1:]
    breached = [i for i, f in enumerate(frames) if "active breaches: none" not in f]
    assert breached, out.stdout[-3000:]
    assert breached[0] <= 12, "breaches within ~12 s of the start"
    assert re.search(r"breach +warning +/v1/chat/completions +p95=", frames[breached[0]])
    # then every breach resolved (a later one, on a loaded machine, does not undo that)
    calm = [i for i, f in enumerate(frames) if i > breached[0] and "active breaches: none" in f]
    assert calm, frames[-1]
    assert re.search(r"resolved +warning +/v1/chat/completions +p95=", frames[calm[0]])


def _failure(route: str) -> TimingRecord:
    return TimingRecord(
        0.0, None, None, None, None, 0.01, 0.0, "GET", route, 502, 0, 0, False, "r", None,
        "connect", 0.01,
    )  # fmt: skip


def test_error_column_counts_the_window_only():
    now = [1000.0]
    errors = ErrorCounter(10, clock=lambda: now[0])
    for _ in range(3):
        errors.observe(_failure("/a"))
    now[0] += 5
    errors.observe(_failure("/a"))
    assert errors.count("/a", False) == 4 and errors.count("*", False) == 4
    now[0] += 6  # the first three are 11 s old: out of the 10 s window
    assert errors.count("/a", False) == 1
    now[0] += 5
    assert errors.count("/a", False) == 0 and errors.count("*", False) == 0


async def test_demo_receiver_verifies_signatures_except_on_unsigned_paths():
    import time

    import aiohttp

    from sidecar.demo.receiver import receiver_app
    from sidecar.sinks.webhook import sign

    from .conftest import serve_app

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    app = receiver_app(secret, ["/hooks/alertmanager"])
    body = b'{"type": "breach"}'
    ts = int(time.time())
    signed = {"webhook-id": "m1", "webhook-timestamp": str(ts),
              "webhook-signature": sign(secret, "m1", ts, body)}  # fmt: skip
    async with serve_app(app) as url, aiohttp.ClientSession() as client:

        async def post(path: str, data: bytes, headers: dict[str, str]) -> int:
            async with client.post(url + path, data=data, headers=headers) as r:
                return r.status

        assert await post("/hooks/latency", body, signed) == 204
        assert await post("/hooks/latency", body, {}) == 401  # unsigned
        assert await post("/hooks/latency", b'{"type": "x"}', signed) == 401  # forged
        # Alertmanager's path: no signature needed, and only that path
        assert await post("/hooks/alertmanager", b'{"alerts": []}', {}) == 204
        assert await post("/hooks/alertmanager/x", b'{"alerts": []}', {}) == 401


def test_breach_footer_names_the_metric_and_the_cause():
    base = {"route": "/v1/chat", "severity": "warning", "quantile": "p95", "value_ms": 250.0}
    assert breach_names([
        {**base, "stream": False, "metric": "latency", "cause": "upstream"},
        {**base, "stream": True, "metric": "ttft", "cause": "sidecar"},
    ]) == [
        "/v1/chat p95=250.0ms (warning, cause upstream)",
        "/v1/chat stream ttft_p95=250.0ms (warning, cause sidecar)",
    ]  # fmt: skip


def test_the_slowdown_schedule_starts_with_the_first_request():
    """In a compose stack the gateway starts long before the traffic (which waits for
    every healthcheck): its first slow phase must not be spent before anyone asks."""
    gateway = DemoGateway(seed=1, schedule=Schedule(3600, slow_from_s=0, slow_to_s=0.5))
    assert gateway.started is None  # however long it idles, no time is counted yet
    assert gateway.slowdown() == 5.0  # the first request: the cycle starts, slow
    assert gateway.started is not None
    assert DemoGateway(seed=1).slowdown() == 1.0  # no schedule: never slower


def test_event_lines_in_the_table_are_escaped():
    """Fleet events' routes were read back from Redis: no escape sequence of theirs
    reaches the terminal the demo table is drawn on."""
    from sidecar.demo.table import render
    from sidecar.events import BREACH, Event
    from sidecar.percentiles import Snapshot

    event = Event(
        type=BREACH, severity="warning", route="/x\x1b[2J\u202e", stream=False,
        quantile="p95", window_s=10, value_ms=250.0, threshold_ms=100, samples=50,
        instance="pod", ts=0.0, scope="fleet", fleet="t",
    )  # fmt: skip
    text = render(Snapshot(0.0, (10,), {}), ErrorCounter(10), 5.0, events=[event])
    assert "\\x1b[2J\\u202e" in text
    assert all(line.isprintable() for line in text.splitlines()), text
