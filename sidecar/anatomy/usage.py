"""Token usage of a unary JSON answer, read from the tail of its body.

The body streams through the proxy untouched and unbuffered; the proxy keeps
references to the last two chunks it forwarded (no copy) and hands them here when the
body has ended. LLM APIs put ``usage`` at the end of the answer (OpenAI chat and
completions, the Responses API, Anthropic Messages), so the last `TAIL` bytes hold it.
The last ``"usage"`` key in the tail is decoded as one JSON object; a body without it,
compressed, truncated or of any other shape gives None, never an error.
"""

from __future__ import annotations

import json
from typing import Any

TAIL = 4096  # bytes of the body's end searched for "usage"
_KEY = b'"usage"'
_decoder = json.JSONDecoder()


TOKENS_MAX = 2**31  # more than any answer holds; a bigger count is not believed


def token_count(value: Any) -> int | None:
    """A reported token count, if it is one: an int in [0, `TOKENS_MAX`) (an upstream
    could send 10**4000, which no float — nor a Prometheus sample — can hold)."""
    return value if type(value) is int and 0 <= value < TOKENS_MAX else None


def usage_of(before: bytes, last: bytes) -> tuple[int | None, int | None] | None:
    """(output tokens, input tokens) from the body's last two chunks; None without usage."""
    if len(last) >= TAIL:
        tail = last[-TAIL:]
    elif before:  # the key may straddle the two chunks
        tail = before[-(TAIL - len(last)) :] + last
    else:
        tail = last
    at = tail.rfind(_KEY)
    if at < 0:
        return None
    try:
        text = tail[at + len(_KEY) :].decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.lstrip()
    if not text.startswith(":"):
        return None
    try:
        usage, _ = _decoder.raw_decode(text[1:].lstrip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(usage, dict):
        return None
    output = token_count(usage.get("completion_tokens", usage.get("output_tokens")))
    prompt = token_count(usage.get("prompt_tokens", usage.get("input_tokens")))
    if output is None and prompt is None:
        return None
    return output, prompt
