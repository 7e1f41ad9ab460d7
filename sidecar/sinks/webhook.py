"""Webhook sink: one queue and task per URL, so a slow or dead receiver never delays
the others. Signed per the Standard Webhooks spec when a secret is configured."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence

import aiohttp

from ..alerts import webhook_payload
from ..config import redact_url
from ..events import Event
from ..metrics import Metrics
from .http import bounded_answer, failure, refusal
from .queue import QueuedSink

TIMEOUT = aiohttp.ClientTimeout(total=5)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature` value: ``v1,<base64 HMAC-SHA256 of "{id}.{ts}.{body}">``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSink(QueuedSink):
    def __init__(
        self,
        url: str,
        *,
        fmt: str,
        secret: str,
        capacity: int,
        metrics: Metrics,
    ) -> None:
        super().__init__("webhook", capacity, metrics, label=f"webhook {redact_url(url)}")
        self.url = url
        self._fmt = fmt
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def body(self, event: Event) -> bytes:
        doc = webhook_payload(event) if self._fmt == "alertmanager" else event.as_json()
        return json.dumps(doc, separators=(",", ":")).encode()

    async def deliver(self, batch: Sequence[Event]) -> int:
        event = batch[0]
        try:
            body = self.body(event)
        except ValueError as exc:  # cannot be encoded: resending will not help
            self.give_up(event, str(exc))
            return 1
        headers = {"Content-Type": "application/json", "User-Agent": "latency-sidecar"}
        if self._secret:
            ts = int(time.time())
            headers["webhook-id"] = event.event_id  # stable across retries
            headers["webhook-timestamp"] = str(ts)
            headers["webhook-signature"] = sign(self._secret, event.event_id, ts, body)
        try:
            assert self._session is not None, "sink not entered"
            async with self._session.post(
                self.url, data=body, headers=headers, timeout=TIMEOUT, allow_redirects=False
            ) as resp:
                status = resp.status
                await bounded_answer(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise failure(exc) from None
        reason = refusal(status)
        if reason is not None:  # the receiver refuses this event: resending will not help
            self.give_up(event, reason)
        return 1
