"""Periodic work on the event loop (percentile ticks, breach evaluation, sweeps).

Components expose plain synchronous steps (`Percentiles.tick`, `BreachDetector.evaluate`);
a `Ticker` decides when they run. `LoopTicker` runs each on its own drift-free schedule
in a background task; tests inject one that schedules nothing and drive the steps
themselves (tests/conftest.py `ManualTicker`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Step = Callable[[], object]


class Ticker(Protocol):
    def every(self, interval_s: float, step: Step, name: str) -> None:
        """Run ``step`` every ``interval_s`` seconds from now on."""


class LoopTicker:
    """``async with LoopTicker() as ticker``: the schedules stop when the block exits."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, interval_s: float, step: Step, name: str) -> None:
        self._tasks.append(asyncio.create_task(_repeat(interval_s, step, name), name=name))

    async def __aenter__(self) -> LoopTicker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


async def _repeat(interval_s: float, step: Step, name: str) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time() + interval_s
    while True:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        next_at += interval_s
        try:
            step()
        except Exception:  # keep the schedule: one failure must not stop it for good
            log.exception("%s failed", name)
