"""`latency-sidecar events`: read breach events back from the Redis Stream.

Anything in the stream may have been written by another producer: bytes that are not
UTF-8 are shown as ``\\xNN``, and control characters never reach the terminal (text:
escaped by `printable`; ``--json``: JSON escapes, DEL included).

``--follow`` blocks in ``XREAD BLOCK`` for `BLOCK_MS` at a time on a connection whose
socket timeout is longer, so silence is never mistaken for a dead server.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

import redis.asyncio as aioredis

from .printable import printable

BLOCK_MS = 2000
SOCKET_TIMEOUT_S = 10.0  # > BLOCK_MS: an XREAD BLOCK answer always comes first


def format_event(entry_id: str, f: dict[str, str]) -> str:
    kind = f.get("type", "?")
    stream = " stream" if f.get("stream") == "true" else ""
    where = f"{f.get('route', '?')}{stream}"
    if kind == "slow_request":
        trace = f" trace={f['trace_id']}" if f.get("trace_id") else ""
        what = (
            f"{f.get('value_ms')}ms > {f.get('threshold_ms')}ms "
            f"request_id={f.get('request_id', '')}{trace}"
        )
    else:
        verb = ">" if kind == "breach" else "<="
        metric = f.get("metric") or "latency"
        name = f.get("quantile") if metric == "latency" else f"{metric}_{f.get('quantile')}"
        cause = f", cause {f['cause']}" if f.get("cause") else ""
        fleet = (
            f", fleet {f.get('fleet')} of {f.get('instances')}" if f.get("scope") == "fleet" else ""
        )
        what = (
            f"{name}={f.get('value_ms')}ms {verb} {f.get('threshold_ms')}ms "
            f"(window {f.get('window_s')}s, {f.get('samples')} samples{cause}{fleet})"
        )
    return (
        f"{f.get('ts', '')}  {kind:<12} {f.get('severity', ''):<8} {where:<32} {what}"
        f"  [{f.get('instance', '')}]"
    )


def _write(out: TextIO, entry_id: str, fields: dict[str, str], as_json: bool) -> None:
    if as_json:  # ensure_ascii escapes every control character but DEL
        out.write(json.dumps({"id": entry_id, **fields}).replace("\x7f", "\\u007f") + "\n")
    else:
        safe = {printable(k): printable(v) for k, v in fields.items()}
        out.write(format_event(printable(entry_id), safe) + "\n")
    out.flush()


async def read_events(
    url: str, stream: str, *, count: int, follow: bool, as_json: bool, out: TextIO
) -> int:
    client = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="backslashreplace",
        socket_connect_timeout=5,
        socket_timeout=SOCKET_TIMEOUT_S,
    )
    try:
        # anchor on the newest entry even when printing none, so following starts
        # exactly after what exists now (XREAD from "$" could miss one in between)
        newest: list[Any] = await client.xrevrange(stream, count=max(1, count)) or []
        for entry_id, fields in reversed(newest[: max(0, count)]):
            _write(out, entry_id, fields or {}, as_json)
        last_id = newest[0][0] if newest else "0-0"
        while follow:
            got: Any = await client.xread({stream: last_id}, block=BLOCK_MS, count=100) or []
            for _, entries in got:
                for entry_id, fields in entries:
                    _write(out, entry_id, fields or {}, as_json)
                    last_id = entry_id
        return 0
    finally:
        await client.aclose()
