"""Incremental SSE scanning of a streamed LLM answer: when did the first token arrive,
how many output chunks followed, and what usage did the stream report.

`SseScanner.feed` sees every body chunk of a ``text/event-stream`` response as it
passes through the proxy. It finds event boundaries (a blank line) and looks at each
event with substring tests first; JSON is parsed only where an event can answer a
question still open:

- before the first token, an event that mentions a content key (``"content"``,
  ``"tool_calls"``, ``"text"``, ``"delta"``, ...) is parsed to tell output from a
  role-only chunk or a keep-alive; comments (``: ping``) and events without ``data:``
  are never parsed;
- after it, nothing is parsed while streaming: an event counts as an output chunk
  when it mentions its shape's output key (a finish chunk with an empty delta does
  not); any other event that mentions a token count (``_tokens"``) is only
  remembered, and the last one is parsed once, at the end (a final usage chunk has no
  output: ``"choices": []``, Anthropic's ``message_delta``).

Recognised shapes (`SseScanner.shape`):
- ``openai``: chat completions chunks (``choices[].delta.content`` / ``tool_calls`` /
  ``function_call`` / ``reasoning_content`` non-empty), legacy completions
  (``choices[].text``), ``usage`` in the final chunk (``stream_options.include_usage``);
- ``anthropic``: Messages API events (``content_block_delta`` is output;
  ``message_start`` carries the input tokens, ``message_delta`` the output tokens);
- ``responses``: OpenAI Responses API events (``response.*.delta`` with a non-empty
  ``delta`` is output; ``response.completed`` carries usage);
- ``unknown``: anything else. The first token is then the first body byte, and the
  time per output chunk counts every ``data:`` event. Never an error: a payload that
  is not JSON, or JSON of another shape, only stops the scanner from looking further
  (after `MAX_MISSES` tries).

Bounded: an event longer than `MAX_EVENT` bytes stops the scanning of that stream
(its first token falls back to the first byte).
"""

from __future__ import annotations

import json
from typing import Any

from ..record import AnatomyFields
from .usage import token_count

MAX_EVENT = 1 << 16  # bytes of one event kept while its end has not arrived
MAX_MISSES = 8  # candidate events parsed without recognising the shape, then give up

_SEEKING, _COUNTING, _UNKNOWN, _DEAD = 0, 1, 2, 3
_DONE = b"[DONE]"
_loads = json.loads


class SseScanner:
    """One stream's scanner. ``feed(chunk, now)`` per body chunk, `result` at the end."""

    __slots__ = (
        "_buf",
        "_misses",
        "_state",
        "_usage_event",
        "chunks",
        "first_token_at",
        "input_tokens",
        "last_at",
        "last_chunk_at",
        "output_tokens",
        "shape",
    )

    def __init__(self) -> None:
        self._buf = b""
        self._state = _SEEKING
        self._misses = 0
        self._usage_event: bytes | None = None
        self.shape = "unknown"
        self.first_token_at: float | None = None  # the first output event's arrival
        self.last_at = 0.0  # the last body chunk's arrival
        self.last_chunk_at = 0.0  # the last output-chunk event's arrival
        self.chunks = 0  # output-chunk events: from the first token (or first event) on
        self.output_tokens: int | None = None
        self.input_tokens: int | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        self.last_at = now
        state = self._state
        if state == _DEAD:
            return
        buf = self._buf + chunk if self._buf else chunk
        # (bytes.find, never `in`: CPython 3.11 tries `x in bytes` as an int first and
        # builds and drops a TypeError each time, 2-3x the cost of the search)
        if buf.find(b"\r") >= 0:  # CRLF line ends: the same events, one byte shorter per line
            buf = buf.replace(b"\r\n", b"\n")
        pos = 0
        find = buf.find
        end = find(b"\n\n")
        if state == _COUNTING:  # after the first token: substring tests only, no copies
            keys = _OUTPUT_KEYS[self.shape]
            key = keys[0]
            while end >= 0:
                if find(key, pos, end) >= 0 or _other_keys(buf, keys, pos, end):
                    self.chunks += 1
                    self.last_chunk_at = now
                elif find(b'_tokens"', pos, end) >= 0:  # usage: parsed once, at the end
                    self._usage_event = buf[pos:end]
                pos = end + 2
                end = find(b"\n\n", pos)
        while end >= 0:
            event = buf[pos:end]
            pos = end + 2
            if event[:5] == b"data:" and event.find(b"\n") < 0:
                data = event[6:] if event[5:6] == b" " else event[5:]
            else:
                found = _data_of(event)
                if found is None:  # a comment (": ping"), or only event:/id:/retry: lines
                    end = find(b"\n\n", pos)
                    continue
                data = found
            if data == _DONE:
                pass
            elif data.find(b'_tokens"') >= 0:  # usage: parsed once, at the end (the last wins)
                self._usage_event = event
                if state == _SEEKING and self._candidate(data):
                    state = self._seek(data, now)
            elif state == _SEEKING:
                if self._candidate(data):
                    state = self._seek(data, now)
                else:
                    self.chunks += 1  # counted for the fallback: per chunk from the first
                    self.last_chunk_at = now
            elif state == _UNKNOWN or _carries_output(data, self.shape):
                self.chunks += 1
                self.last_chunk_at = now
            end = find(b"\n\n", pos)
        rest = buf[pos:] if pos else buf
        if len(rest) > MAX_EVENT:
            self._state = _DEAD
            self._buf = b""
            return
        self._buf = rest
        self._state = state

    @staticmethod
    def _candidate(data: bytes) -> bool:
        return (
            data.find(b'"content"') >= 0
            or data.find(b'"text"') >= 0
            or data.find(b'"delta"') >= 0
            or data.find(b'"tool_calls"') >= 0
            or data.find(b'"function_call"') >= 0
            or data.find(b'"reasoning_content"') >= 0
        )

    def _seek(self, data: bytes, now: float) -> int:
        """Parse a candidate event before the first token; the new state."""
        try:
            doc = _loads(data)
        except (ValueError, RecursionError):
            doc = None
        verdict = _output_of(doc) if isinstance(doc, dict) else None
        if verdict is None:
            self._misses += 1
            self.chunks += 1
            self.last_chunk_at = now
            return _UNKNOWN if self._misses >= MAX_MISSES else _SEEKING
        shape, output = verdict
        self.shape = shape
        if shape == "anthropic" and doc is not None and doc.get("type") == "message_start":
            message = doc.get("message")
            if isinstance(message, dict):
                self._take_usage(message.get("usage"))
        if not output:
            return _SEEKING
        self.first_token_at = now
        self.chunks = 1  # the per-chunk count starts at the first token
        self.last_chunk_at = now
        return _COUNTING

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        out = token_count(usage.get("completion_tokens", usage.get("output_tokens")))
        inp = token_count(usage.get("prompt_tokens", usage.get("input_tokens")))
        if out is not None:
            self.output_tokens = out
        if inp is not None:
            self.input_tokens = inp

    def result(self, first_byte_at: float | None) -> AnatomyFields:
        """(first token time, time per output token or, without usage, per output chunk,
        output tokens, input tokens): the record's anatomy fields. Called once, when
        the stream ended."""
        usage = self._usage_event
        data = None if usage is None else _data_of(usage)
        if data is not None:
            try:
                doc = _loads(data)
            except (ValueError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                found = doc.get("usage")
                if found is None:
                    inner = doc.get("response") or doc.get("message")
                    if isinstance(inner, dict):
                        found = inner.get("usage")
                self._take_usage(found)
        first = self.first_token_at
        if first is None:
            first = first_byte_at
        per_token = None
        if first is not None:
            tokens = self.output_tokens
            if tokens is not None and tokens > 1:
                per_token = max(0.0, self.last_at - first) / (tokens - 1)
            elif tokens is None and self.chunks > 1 and self._state != _DEAD:
                per_token = max(0.0, self.last_chunk_at - first) / (self.chunks - 1)
        return first, per_token, self.output_tokens, self.input_tokens


def _carries_output(data: bytes, shape: str) -> bool:
    """After the first token, without parsing: does this event of a known shape carry
    output (not a finish chunk, a stop event or a keep-alive)?"""
    keys = _OUTPUT_KEYS[shape]
    return data.find(keys[0]) >= 0 or _other_keys(data, keys, 0, len(data))


def _other_keys(buf: bytes, keys: tuple[bytes, ...], pos: int, end: int) -> bool:
    for key in keys[1:]:  # noqa: SIM110  (any() of a generator costs more)
        if buf.find(key, pos, end) >= 0:
            return True
    return False


_OUTPUT_KEYS = {
    "openai": (b'"content"', b'"tool_calls"', b'"text"', b'"function_call"',
               b'"reasoning_content"'),
    "anthropic": (b'"content_block_delta"',),
    "responses": (b'.delta"',),
    "unknown": (b"",),
}  # fmt: skip


def _data_of(event: bytes) -> bytes | None:
    """The data of an event with several lines (``event:``, ``id:``, comments, or data
    split over several ``data:`` lines); None when it has no ``data:`` line."""
    parts = []
    for line in event.split(b"\n"):
        if line[:5] == b"data:":
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    if not parts:
        return None
    return b"\n".join(parts)


def _output_of(doc: dict[str, Any]) -> tuple[str, bool] | None:
    """(shape, carries output) of a parsed event; None when the shape is not known."""
    choices = doc.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and (
                delta.get("content")
                or delta.get("tool_calls")
                or delta.get("function_call")
                or delta.get("reasoning_content")
            ):
                return "openai", True
            if choice.get("text"):
                return "openai", True
        return "openai", False
    kind = doc.get("type")
    if isinstance(kind, str):
        if kind == "content_block_delta":
            return "anthropic", True
        if kind in _ANTHROPIC:
            return "anthropic", False
        if kind.startswith("response."):
            if kind.endswith(".delta"):
                return "responses", bool(doc.get("delta"))
            return "responses", False
    return None


_ANTHROPIC = frozenset(
    {"message_start", "content_block_start", "content_block_stop", "message_delta",
     "message_stop", "ping"}
)  # fmt: skip
