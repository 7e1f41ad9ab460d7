"""Control characters from clients never reach a log line or a terminal; everyday
`events` commands end without a traceback (issue 10, SPEC "Hostile input")."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from .process import spawn_sidecar
from .rawhttp import raw_request
from .test_events import wait_until

EVENTS = [sys.executable, "-m", "sidecar", "events"]
# %0a starts a forged line that looks like a real one, %1b[2J would clear a terminal
FORGING_PATH = "/v1/x%0a2026-11-27%2010:00:00,000%20ERROR%20%20%20sidecar:%20FORGED%1b%5b2J"
ITS_LABEL = "/v1/x\\x0a2026-11-27 10:00:00,000 ERROR   sidecar: FORGED\\x1b[2J"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_percent_encoded_controls_cannot_forge_a_log_line(upstream, fmt):
    up, url = upstream
    up.delays = [0.08]  # slow: its slow_request event is logged with the route
    sc = await spawn_sidecar(
        url, SIDECAR_LOG_FORMAT=fmt, SIDECAR_LOG_LEVEL="debug", SIDECAR_SLOW_REQUEST_MS="20"
    )
    answer = await raw_request(
        sc.port, f"GET {FORGING_PATH} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 200")

    async def logged():
        return b"slow_request" in sc.stderr

    await wait_until(logged, timeout=10)
    sc.terminate()
    assert await sc.wait() == 0
    raw = bytes(sc.stderr)
    assert b"\x1b" not in raw and b"\r" not in raw and b"\x00" not in raw
    lines = raw.decode().splitlines()
    assert not [line for line in lines if line.startswith("2026-11-27 10:00:00,000")]
    if fmt == "json":
        docs = [json.loads(line) for line in lines]  # every line is one JSON document
        (slow,) = [d for d in docs if d["msg"].startswith("slow_request")]
        assert slow["event"]["route"] == ITS_LABEL
    else:  # a line is a record (timestamp first) or part of a traceback (indented)
        start = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} |    ")
        assert all(start.match(line) for line in lines), lines
        (slow,) = [line for line in lines if "slow_request" in line]
        assert ITS_LABEL in slow


async def _xadd_raw(url: str, fields: dict[str, bytes]) -> None:
    """As another producer would: any bytes, no sanitising."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.xadd("sidecar:events", fields)  # type: ignore[arg-type]
    finally:
        await client.aclose()


HOSTILE_ENTRY = {
    "event_id": b"e1",
    "type": b"breach\x1b[2J",
    "severity": b"warning",
    "route": b"/r\nFORGED \xc2\x9b31m",  # newline, C1 CSI (UTF-8)
    "quantile": b"p95",
    "instance": b"pod\xff\x7f",  # not UTF-8, DEL
    "ts": b"2026-11-27T10:00:00.000Z",
}
_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")  # all but "\n"


@pytest.mark.tools
async def test_events_cli_escapes_what_another_producer_wrote(redis_server):
    await _xadd_raw(redis_server.url, HOSTILE_ENTRY)
    env = _env(SIDECAR_REDIS_URL=redis_server.url)
    text = subprocess.run([*EVENTS, "--count", "5"], env=env, capture_output=True, timeout=30)
    assert text.returncode == 0, text.stderr
    assert not _CONTROL.search(text.stdout), text.stdout
    (line,) = text.stdout.decode().splitlines()
    assert "breach\\x1b[2J" in line and "/r\\x0aFORGED \\x9b31m" in line
    assert "[pod\\xff\\x7f]" in line

    as_json = subprocess.run(
        [*EVENTS, "--count", "5", "--json"], env=env, capture_output=True, timeout=30
    )
    assert as_json.returncode == 0, as_json.stderr
    assert not _CONTROL.search(as_json.stdout), as_json.stdout
    (doc,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert doc["type"] == "breach\x1b[2J"  # the data itself, JSON-escaped on the wire
    assert doc["route"] == "/r\nFORGED \x9b31m"
    assert doc["instance"] == "pod\\xff\x7f"  # bytes that are not UTF-8 shown as \xNN


@pytest.mark.tools
@pytest.mark.slow
async def test_events_follow_outlives_silence(redis_server):
    """`--follow` used to die with redis TimeoutError after ~5 s without events."""
    env = _env(SIDECAR_REDIS_URL=redis_server.url)
    follow = await asyncio.create_subprocess_exec(
        *EVENTS, "--follow", "--count", "0", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        with pytest.raises(TimeoutError):  # 6.5 s of silence: still following
            await asyncio.wait_for(follow.wait(), 6.5)
        await _xadd_raw(redis_server.url, {"event_id": b"late", "type": b"breach"})
        assert follow.stdout is not None
        line = await asyncio.wait_for(follow.stdout.readline(), 10)
        assert json.loads(line)["event_id"] == "late"
    finally:
        if follow.returncode is None:
            follow.terminate()
        await follow.wait()


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["events"], "events"),
        (["events", "--follow"], "events"),
        (["fleet", "--fleet", "f"], "the fleet"),
        (["fleet", "--fleet", "f", "--watch"], "the fleet"),
    ],
)
def test_redis_readers_with_redis_unreachable_are_one_line_exit_2(closed_port, command, what):
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", *command, "--redis-url", f"redis://127.0.0.1:{closed_port}"],
        env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"latency-sidecar: cannot read {what} from Redis: ")
    assert str(closed_port) in line
