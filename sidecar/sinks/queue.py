"""The delivery loop every sink shares: a bounded, ordered queue drained by one task.

- `enqueue` never blocks: past `capacity` the oldest event is dropped and counted.
- The head stays queued until delivered, so order holds across outages.
- Failures back off exponentially with full jitter, capped; success resets it.
- An event a sink cannot encode is undeliverable (`give_up`): dropped, counted
  (``result="dropped"``), logged, and the rest of its batch goes on. A head event
  that fails with an unexpected error `HEAD_FAILURES_MAX` times in a row is treated
  the same, so no single event can stop a sink for good.
- `flush` (on SIGTERM) stops waiting once the sink has failed for `DEAD_AFTER_S`
  without a success: what is still queued is counted as dropped and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Self

from ..events import Event
from ..metrics import Metrics
from ..printable import untrusted

log = logging.getLogger(__name__)
DEAD_AFTER_S = 5.0  # failing this long without a success: flush stops waiting
HEAD_FAILURES_MAX = 3  # unexpected errors in a row on one head event: it is dropped


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
        self._given_up = 0  # in the batch being delivered
        self._undeliverable = 0
        self._last_undeliverable_log = float("-inf")
        self._failing_since: float | None = None  # loop time; None while healthy
        self._failed_head: Event | None = None
        self._head_failures = 0
        self._attempting = False
        self._changed = asyncio.Event()  # an attempt ended, or the queue emptied
        self._retry_now = asyncio.Event()
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

    async def deliver(self, batch: Sequence[Event]) -> int:
        raise NotImplementedError

    def give_up(self, event: Event, reason: str) -> None:
        """Called by `deliver` for an event it can never deliver (cannot encode it, or
        the receiver refuses it):
        counted as dropped and logged (at most one line per 10 s per sink); `deliver`
        still returns it as done so the queue moves on."""
        self._dropped.inc()
        self._given_up += 1
        self._undeliverable += 1
        now = time.monotonic()
        if now - self._last_undeliverable_log >= 10:
            self._last_undeliverable_log = now
            log.warning(
                "%s: event %s is undeliverable (%s); dropped",
                self.label,
                event.event_id,
                untrusted(reason, 200),
                extra={"sink": self.name, "undeliverable": self._undeliverable},
            )

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._idle.set()
                self._changed.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [queue[i] for i in range(min(self.batch_size, len(queue)))]
            self._given_up = 0
            self._attempting = True
            try:
                done = await self.deliver(batch)
            except RetryLater as exc:
                self._attempt_over(failed=True)
                self._retry.inc()
                self._warn(f"{self.label}: {exc}; retrying")
                await self._sleep(self.backoff.next_delay())
                continue
            except Exception:  # a bug must not kill delivery for good
                log.exception("%s: delivery failed unexpectedly", self.label)
                self._attempt_over(failed=True)
                self._retry.inc()
                head = batch[0]
                self._head_failures = self._head_failures + 1 if head is self._failed_head else 1
                self._failed_head = head
                if self._head_failures >= HEAD_FAILURES_MAX:  # never stuck on one event
                    self.give_up(head, f"failed {self._head_failures} times")
                    self._remove_head([head])
                    self._failed_head, self._head_failures = None, 0
                    continue
                await self._sleep(self.backoff.next_delay())
                continue
            self._attempt_over(failed=False)
            self.backoff.reset()
            self._failed_head, self._head_failures = None, 0
            self._remove_head(batch[:done])
            self._ok.inc(done - self._given_up)

    def _remove_head(self, done: Sequence[Event]) -> None:
        queue = self._queue
        delivered = {id(e) for e in done}
        # enqueue() may have dropped from the head meanwhile: remove by identity
        removed = 0
        while queue and id(queue[0]) in delivered:
            queue.popleft()
            removed += 1
        self._depth.dec(removed)

    def _attempt_over(self, *, failed: bool) -> None:
        self._attempting = False
        if not failed:
            self._failing_since = None
        elif self._failing_since is None:
            self._failing_since = asyncio.get_running_loop().time()
        self._changed.set()

    async def _sleep(self, delay: float) -> None:
        """Back off; `flush` cuts it short to try once more at once."""
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._retry_now.wait()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10:  # one line per outage burst, not per retry
            self._last_warning = now
            log.warning(message, extra={"sink": self.name, "queued": len(self._queue)})

    async def flush(self, within_s: float) -> None:
        """Wait up to ``within_s`` for the queue to empty; stop sooner once the sink has
        failed for `DEAD_AFTER_S` with no success and is not in the middle of an
        attempt. What is left is counted as dropped and logged with its count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        self._retry_now.set()  # cut the current backoff short: one more try at once
        while not self._idle.is_set():
            now = loop.time()
            if now >= deadline:
                self._drop_queued("shutdown grace period over")
                return
            wake = deadline
            since = self._failing_since
            if since is not None:
                if not self._attempting and now - since >= DEAD_AFTER_S:
                    self._drop_queued(f"sink failing for {now - since:.1f}s")
                    return
                wake = min(wake, max(now, since + DEAD_AFTER_S))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake):
                    await self._changed.wait()

    def _drop_queued(self, why: str) -> None:
        n = len(self._queue)
        if not n:
            return
        self._queue.clear()
        self._depth.dec(n)
        self._dropped.inc(n)
        log.warning(
            "%s: %d events dropped at exit (%s)",
            self.label,
            n,
            why,
            extra={"sink": self.name, "dropped": n},
        )
