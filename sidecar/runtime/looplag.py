"""Event-loop lag: how late a periodic timer on the loop wakes up."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLag:
    """Wakes every `interval` s and measures how late it woke: the event-loop lag.
    Keeps the current lag and the per-second maxima of the last minute."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.current = 0.0
        self._maxima: deque[tuple[int, float]] = deque(maxlen=60)

    @property
    def max_1m(self) -> float:
        cutoff = int(time.monotonic()) - 60
        return max((v for sec, v in self._maxima if sec > cutoff), default=self.current)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            self.current = lag
            sec = int(time.monotonic())
            if self._maxima and self._maxima[-1][0] == sec:
                if lag > self._maxima[-1][1]:
                    self._maxima[-1] = (sec, lag)
            else:
                self._maxima.append((sec, lag))
