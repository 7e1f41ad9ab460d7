"""`latency-sidecar events`: read breach events back from the Redis Stream."""

from __future__ import annotations

import json
from typing import Any, TextIO

import redis.asyncio as aioredis


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
        what = (
            f"{f.get('quantile')}={f.get('value_ms')}ms {verb} {f.get('threshold_ms')}ms "
            f"(window {f.get('window_s')}s, {f.get('samples')} samples)"
        )
    return (
        f"{f.get('ts', '')}  {kind:<12} {f.get('severity', ''):<8} {where:<32} {what}"
        f"  [{f.get('instance', '')}]"
    )


def _write(out: TextIO, entry_id: str, fields: dict[str, str], as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"id": entry_id, **fields}) + "\n")
    else:
        out.write(format_event(entry_id, fields) + "\n")
    out.flush()


async def read_events(
    url: str, stream: str, *, count: int, follow: bool, as_json: bool, out: TextIO
) -> int:
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
    try:
        # anchor on the newest entry even when printing none, so following starts
        # exactly after what exists now (XREAD from "$" could miss one in between)
        newest: list[Any] = await client.xrevrange(stream, count=max(1, count)) or []
        for entry_id, fields in reversed(newest[: max(0, count)]):
            _write(out, entry_id, fields or {}, as_json)
        last_id = newest[0][0] if newest else "0-0"
        while follow:
            got: Any = await client.xread({stream: last_id}, block=5000, count=100) or []
            for _, entries in got:
                for entry_id, fields in entries:
                    _write(out, entry_id, fields or {}, as_json)
                    last_id = entry_id
        return 0
    finally:
        await client.aclose()
