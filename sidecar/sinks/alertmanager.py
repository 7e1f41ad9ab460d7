"""Alertmanager sink: breaches pushed to `POST /api/v2/alerts`.

Alertmanager forgets an alert that is not re-sent, so every firing alert is re-sent
each `resend_s` with ``endsAt = now + 4 * resend_s`` (if the sidecar dies, the alert
ends by itself). A resolve is sent with its real ``endsAt``. Slow-request events are
not alerts here (they have no state to resolve).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence

import aiohttp

from ..alerts import push_alert
from ..config import redact_url
from ..events import BREACH, RESOLVED, Event
from ..metrics import Metrics
from ..printable import untrusted
from .http import bounded_answer, failure, refusal
from .queue import QueuedSink, RetryLater

log = logging.getLogger(__name__)
TIMEOUT = aiohttp.ClientTimeout(total=5)


class AlertmanagerSink(QueuedSink):
    batch_size = 50

    def __init__(
        self,
        base_url: str,
        *,
        capacity: int,
        metrics: Metrics,
        resend_s: float = 60.0,
    ) -> None:
        super().__init__(
            "alertmanager", capacity, metrics, label=f"alertmanager {redact_url(base_url)}"
        )
        self.url = base_url.rstrip("/") + "/api/v2/alerts"
        self._session: aiohttp.ClientSession | None = None
        self.resend_s = resend_s
        self.firing: dict[tuple[str, bool, str, str, str], Event] = {}

    def enqueue(self, event: Event) -> None:
        if event.type == BREACH:
            self.firing[event.rule_key] = event
        elif event.type == RESOLVED:
            self.firing.pop(event.rule_key, None)
        else:
            return
        super().enqueue(event)

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _alerts(self, events: Sequence[Event]) -> list[tuple[Event, str]]:
        """Each event's alert as JSON; one that cannot be encoded is given up on."""
        ends = time.time() + 4 * self.resend_s
        out = []
        for e in events:
            ends_at = None if e.type == RESOLVED else ends
            try:
                out.append((e, json.dumps(push_alert(e, ends_at=ends_at))))
            except ValueError as exc:
                self.firing.pop(e.rule_key, None)
                self.give_up(e, str(exc))
        return out

    async def _post(self, alerts: list[tuple[Event, str]]) -> str | None:
        """POST the alerts; None when Alertmanager took them, else why it refused them
        (raises `RetryLater` when worth retrying)."""
        if not alerts:
            return None
        try:
            assert self._session is not None, "sink not entered"
            async with self._session.post(
                self.url,
                data="[" + ",".join(a for _, a in alerts) + "]",  # a JSON array of the alerts
                headers={"Content-Type": "application/json"},
                timeout=TIMEOUT,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                answer = await bounded_answer(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise failure(exc) from None
        reason = refusal(status)
        if reason is not None:
            said = answer[:800].decode("utf-8", "replace").strip()
            reason = f"{reason}: {untrusted(said, 200)}" if said else reason
        return reason

    async def deliver(self, batch: Sequence[Event]) -> int:
        alerts = self._alerts(batch)
        reason = await self._post(alerts)
        if reason is not None and len(alerts) > 1 and reason.startswith("HTTP 400"):
            # one alert Alertmanager cannot take fails the whole array: one by one, so
            # only that one is lost (those sent twice are the same alerts: idempotent)
            for alert in alerts:
                self._refused([alert], await self._post([alert]))
        else:
            self._refused(alerts, reason)
        return len(batch)

    def _refused(self, alerts: list[tuple[Event, str]], reason: str | None) -> None:
        """Refused (``reason``): resending will not help, nor re-sending later."""
        if reason is not None:
            self._forget(alerts)
            for e, _ in alerts:
                self.give_up(e, reason)

    def _forget(self, alerts: list[tuple[Event, str]]) -> None:
        """Stop re-sending these alerts (a newer state of the same rule stays)."""
        for e, _ in alerts:
            if self.firing.get(e.rule_key) is e:
                del self.firing[e.rule_key]

    async def resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resend_s)
            if self.firing and not len(self):
                alerts = self._alerts(list(self.firing.values()))
                try:
                    reason = await self._post(alerts)
                except RetryLater as exc:
                    self._warn(f"{self.label}: re-send failed: {exc}")
                    continue
                if reason is not None:  # refused: stop re-sending them (each was counted
                    # as delivered once; Alertmanager ends them at their endsAt)
                    self._forget(alerts)
                    self._warn(f"{self.label}: re-send refused, not re-sent again: {reason}")

    async def run(self) -> None:
        resend = asyncio.create_task(self.resend_loop())
        try:
            await super().run()
        finally:
            resend.cancel()
