"""Event-loop lag: how late a periodic timer on the loop wakes up."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLag:
    """Wakes every `interval` s and measures how late it woke: the event-loop lag.
    Keeps the current lag and the per-second maxima of the last hour (a breach window
    can be that long)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.current = 0.0
        self._maxima: deque[tuple[int, float]] = deque(maxlen=3600)
        self._due = 0.0  # loop time the next wake-up is due

    def max_over(self, seconds: float) -> float:
        """The worst lag of the last ``seconds`` (whole seconds), including a wake-up
        that is overdue right now."""
        cutoff = int(time.monotonic()) - seconds
        worst = self.current
        for sec, v in reversed(self._maxima):
            if sec <= cutoff:
                break
            if v > worst:
                worst = v
        return max(worst, self.overdue())

    def overdue(self) -> float:
        """How late the pending wake-up already is (0 when not running or on time)."""
        if not self._due:
            return 0.0
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # another thread (a scrape): the last measurement only
            return 0.0
        return max(0.0, now - self._due)

    @property
    def max_1m(self) -> float:
        cutoff = int(time.monotonic()) - 60
        return max((v for sec, v in self._maxima if sec > cutoff), default=self.current)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = self._due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            self.current = lag
            sec = int(time.monotonic())
            if self._maxima and self._maxima[-1][0] == sec:
                if lag > self._maxima[-1][1]:
                    self._maxima[-1] = (sec, lag)
            else:
                self._maxima.append((sec, lag))
