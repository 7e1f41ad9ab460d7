"""CPU cost of the latency anatomy: per SSE event, per stream, per unary usage read.

    python bench/anatomy.py [--events 200] [--streams 2000] [--json]

What the proxy adds for a ``text/event-stream`` answer is `SseScanner.feed` per body
chunk plus `SseScanner.result` and the `Anatomy` observer once per stream; for a unary
answer, `usage_of` over the last two chunks. Measured with ``time.process_time`` over
many realistic streams (OpenAI chat chunks: a ``: ping``, the role-only chunk, content
chunks, the finish chunk, the usage chunk, ``[DONE]``; and Anthropic Messages events),
each event arriving as its own read (the worst case: one feed per event) and, second,
eight events per read. Prints µs per event and per stream; the target is < 5 µs per
event.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.anatomy.metrics import AnatomyMetrics
from sidecar.anatomy.observer import Anatomy
from sidecar.anatomy.sse import SseScanner
from sidecar.anatomy.usage import usage_of
from sidecar.metrics import Metrics
from sidecar.record import TimingRecord


def openai_events(n: int) -> list[bytes]:
    def chunk(delta: dict[str, str] | None, usage: dict[str, int] | None = None) -> bytes:
        doc: dict[str, Any] = {
            "id": "chatcmpl-AbCdEf0123456789", "object": "chat.completion.chunk",
            "created": 1764237600, "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0123456789",
            "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            "usage": usage,
        }  # fmt: skip
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    events = [b": ping\n\n", chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": f" word{i}"}) for i in range(n)]
    events.append(chunk({}))
    events.append(
        chunk(None, {"prompt_tokens": 40, "completion_tokens": n, "total_tokens": 40 + n})
    )
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_events(n: int) -> list[bytes]:
    def ev(kind: str, doc: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **doc})}\n\n".encode()

    events = [
        ev("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant",
           "content": [], "usage": {"input_tokens": 40, "output_tokens": 1}}}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ev("ping", {}),
    ]  # fmt: skip
    events += [
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f" w{i}"}})
        for i in range(n)
    ]
    events += [
        ev("content_block_stop", {"index": 0}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": n}}),
        ev("message_stop", {}),
    ]
    return events


def per_stream_cost(reads: list[bytes], streams: int, anatomy: Anatomy) -> float:
    """Process-time seconds per stream: feed every read, result, observe."""
    start = time.process_time()
    for i in range(streams):
        scanner = SseScanner()
        feed = scanner.feed
        now = float(i)
        for data in reads:
            now += 0.02
            feed(data, now)
        first, per_token, out, inp = scanner.result(float(i))
        record = TimingRecord(
            float(i), float(i) + 0.001, float(i) + 0.01, now, float(i) + 0.011, now + 0.001,
            0.0, "POST", "/v1/chat/completions", 200, 200, 10_000, True, "r", None, None,
            0.011, first, per_token, out, inp,
        )  # fmt: skip
        anatomy.observe(record)
    return (time.process_time() - start) / streams


def baseline_cost(reads: list[bytes], streams: int) -> float:
    """The same loop without the scanner: what the measurement subtracts."""
    start = time.process_time()
    for i in range(streams):
        now = float(i)
        for _ in reads:
            now += 0.02
    return (time.process_time() - start) / streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="content events per stream")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    anatomy = Anatomy([60, 300], AnatomyMetrics(Metrics([0.1, 1.0]), [0.1, 1.0]))
    results: dict[str, float] = {}
    for shape, events in (("openai", openai_events(args.events)),
                          ("anthropic", anthropic_events(args.events))):  # fmt: skip
        for per_read in (1, 8):
            reads = [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]
            per_stream_cost(reads, 50, anatomy)  # warm up
            cost = per_stream_cost(reads, args.streams, anatomy) - baseline_cost(
                reads, args.streams
            )
            key = f"{shape}_{per_read}_per_read"
            results[f"{key}_us_per_event"] = cost / len(events) * 1e6
            results[f"{key}_us_per_stream"] = cost * 1e6
            print(
                f"{shape:9} {per_read} event(s) per read: {cost / len(events) * 1e6:6.2f} µs "
                f"per event, {cost * 1e6:8.1f} µs per stream of {len(events)} events"
            )
    # for scale on this machine: a full JSON parse of one content event, which the
    # scanner avoids after the first token
    event = openai_events(1)[2]
    start = time.process_time()
    for _ in range(20_000):
        json.loads(event[6:])
    results["json_loads_one_event_us"] = (time.process_time() - start) / 20_000 * 1e6
    print(
        f"(for scale: json.loads of one content event: {results['json_loads_one_event_us']:.2f} µs)"
    )
    usage = {"prompt_tokens": 40, "completion_tokens": 120}
    body = json.dumps({"choices": [{"message": {"content": "x" * 8000}}], "usage": usage})
    before, last = body.encode()[:6000], body.encode()[6000:]
    n = 200_000
    for label, args_ in (("with usage", (before, last)), ("without", (b"", b'{"ok":true}'))):
        start = time.process_time()
        for _ in range(n):
            usage_of(*args_)
        us = (time.process_time() - start) / n * 1e6
        results[f"unary_usage_{label.replace(' ', '_')}_us"] = us
        print(f"unary usage_of, {label}: {us:.2f} µs per response")
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
