"""What the HTTP sinks (webhook, Alertmanager) share: how a receiver's answer is read
and what it means for the events it was sent."""

from __future__ import annotations

import aiohttp

from ..config import redact_url
from .queue import RetryLater

RETRY_4XX = frozenset({408, 425, 429})  # the receiver asks to try again later
ANSWER_BODY_MAX = 64 * 1024  # what a sink reads of a receiver's answer, at most


async def bounded_answer(resp: aiohttp.ClientResponse, limit: int = ANSWER_BODY_MAX) -> bytes:
    """The receiver's answer body, at most ``limit`` bytes of it (a longer one is left
    unread: the connection is then closed, not reused)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = await resp.content.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def failure(exc: BaseException) -> RetryLater:
    """A connection-level failure to retry, its text without the URL's secrets (aiohttp
    names the URL, query string included, in some of its errors)."""
    return RetryLater(redact_url(f"{type(exc).__name__}: {exc}"))


def refusal(status: int) -> str | None:
    """What a receiver's HTTP answer means for the events it was sent: None when they
    are delivered (2xx), `RetryLater` when worth retrying (5xx, 408/425/429), else the
    reason they never will be (4xx; a redirect, which is not followed: events go only
    to the configured URL)."""
    if 200 <= status < 300:
        return None
    if status >= 500 or status in RETRY_4XX:
        raise RetryLater(f"HTTP {status}")
    if 300 <= status < 400:
        return f"HTTP {status} redirect, not followed"
    return f"HTTP {status}"
