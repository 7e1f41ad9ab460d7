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

TAIL = 4096  # bytes of the body's end searched for "usage"
_KEY = b'"usage"'
_decoder = json.JSONDecoder()


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
    out = usage.get("completion_tokens", usage.get("output_tokens"))
    inp = usage.get("prompt_tokens", usage.get("input_tokens"))
    output = out if type(out) is int and out >= 0 else None
    prompt = inp if type(inp) is int and inp >= 0 else None
    if output is None and prompt is None:
        return None
    return output, prompt
