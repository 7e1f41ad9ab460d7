"""The delivery loop every sink shares: a bounded, ordered queue drained by one task.

- `enqueue` never blocks: past `capacity` the oldest event is dropped and counted.
- The head stays queued until delivered, so order holds across outages.
- Failures back off exponentially with full jitter, capped; success resets it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Self

from ..events import Event
from ..metrics import Metrics

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """Delivery failed in a way worth retrying (sink down, timeout, 5xx)."""


class Backoff:
    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


class QueuedSink:
    """Subclasses implement `deliver(batch) -> n`: the number of events from the head
    of ``batch`` now delivered (>= 1), or raise `RetryLater`."""

    batch_size = 1

    def __init__(self, name: str, capacity: int, metrics: Metrics, label: str = "") -> None:
        self.name = name
        self.label = label or name  # for logs: which URL
        self._capacity = capacity
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ok = metrics.deliveries.labels(name, "ok")
        self._retry = metrics.deliveries.labels(name, "retry")
        self._dropped = metrics.deliveries.labels(name, "dropped")
        self._depth = metrics.queue_depth.labels(name)
        self.backoff = Backoff()
        self._last_warning = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        """Open the client (`open`) and start delivering in a background task."""
        await self.open()
        self._task = asyncio.create_task(self.run(), name=f"sink-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop delivering (call `flush` first to deliver what is queued), then close
        the client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.aclose()

    async def open(self) -> None:
        """Subclasses: create the client (an HTTP session, ...)."""

    async def aclose(self) -> None:
        """Subclasses: close the client."""

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, event: Event) -> None:
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._dropped.inc()
            self._depth.dec()
        self._queue.append(event)
        self._depth.inc()
        self._idle.clear()
        self._wakeup.set()

    def count_dropped(self, n: int = 1) -> None:
        """For sinks that give up on an event on purpose (e.g. a 4xx answer)."""
        self._dropped.inc(n)

    async def deliver(self, batch: Sequence[Event]) -> int:
        raise NotImplementedError

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [queue[i] for i in range(min(self.batch_size, len(queue)))]
            try:
                done = await self.deliver(batch)
            except RetryLater as exc:
                self._retry.inc()
                self._warn(f"{self.label}: {exc}; retrying")
                await asyncio.sleep(self.backoff.next_delay())
                continue
            except Exception:  # a bug must not kill delivery for good
                log.exception("%s: delivery failed unexpectedly", self.label)
                self._retry.inc()
                await asyncio.sleep(self.backoff.next_delay())
                continue
            self.backoff.reset()
            delivered = {id(e) for e in batch[:done]}
            # enqueue() may have dropped from the head meanwhile: remove by identity
            removed = 0
            while queue and id(queue[0]) in delivered:
                queue.popleft()
                removed += 1
            self._depth.dec(removed)
            self._ok.inc(done)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10:  # one line per outage burst, not per retry
            self._last_warning = now
            log.warning(message, extra={"sink": self.name, "queued": len(self._queue)})

    async def flush(self, within_s: float) -> None:
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%s: %d events not delivered before exit", self.label, len(self._queue))
