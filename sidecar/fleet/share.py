"""The sharing side: each tick's closed sub-windows become a numbered batch; the
batches go to the store after every tick, off the request path, in one round trip.

While the store is unreachable the batches wait (up to the longest window's worth:
older data could not be in any window any more) and go out, each exactly once, when
it is back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping

from ..percentiles import Key
from ..window import SubWindow
from .store import Batch, FleetStore, Lease

MAX_BATCHES_PER_TRIP = 30


class Sharer:
    def __init__(self, store: FleetStore, keep_s: float) -> None:
        self._store = store
        self._keep_s = keep_s
        self._queue: deque[Batch] = deque()
        self._seq = 0
        self.dropped = 0  # batches too old to matter by the time the store came back

    def on_tick(self, closed: Mapping[Key, SubWindow], now: float | None = None) -> None:
        """`Percentiles.tick` hook: the second that just ended, as one batch."""
        now = time.time() if now is None else now
        self._seq += 1
        self._queue.append(Batch(self._seq, now - 0.5, dict(closed)))
        while self._queue and self._queue[0].at < now - self._keep_s:
            self._queue.popleft()
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, *, want_lease: bool, now: float | None = None) -> Lease | None:
        """Send what is queued and renew (or acquire, or release) the lease. Raises
        `FleetError`; then the batches stay queued for the next attempt."""
        batches = list(self._queue)[:MAX_BATCHES_PER_TRIP]
        lease = await self._store.share(
            batches, now=time.time() if now is None else now, want_lease=want_lease
        )
        if batches:  # (the head may have aged out meanwhile)
            last = batches[-1].seq
            while self._queue and self._queue[0].seq <= last:
                self._queue.popleft()
        return lease
