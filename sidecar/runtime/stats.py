"""The `/stats` document: the sidecar itself, the gateway process, the system.

psutil calls are cheap but not free: they run at most once per `/stats` call or scrape
(in a worker thread), never per proxied request."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from .looplag import LoopLag
from .process import process_doc
from .system import system_doc
from .target import Target


class RuntimeStats:
    """Builds the `/stats` document. `sample()` does the psutil work (call it off the
    loop); `loop_doc()` reads loop-owned state (call it on the loop)."""

    def __init__(self, target: Target, lag: LoopLag, in_flight: Callable[[], int]) -> None:
        self.target = target
        self.lag = lag
        self._in_flight = in_flight
        self._me = psutil.Process()
        self._me.cpu_percent(None)
        self._started = time.time()
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}
        self.last_at = 0.0

    def sample(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if now - self.last_at < 0.5 and self.last:  # scrape + /stats together
                return self.last
            me = process_doc(self._me, cpu_percent=self._me.cpu_percent(None))
            self.last = {
                "sidecar": me,
                "target": self.target.sample(),
                "system": system_doc(),
            }
            self.last_at = now
            return self.last

    def loop_doc(self) -> dict[str, Any]:
        return {
            "event_loop_lag_ms": round(self.lag.current * 1000, 3),
            "event_loop_lag_max_1m_ms": round(self.lag.max_1m * 1000, 3),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "in_flight": self._in_flight(),
            "uptime_s": round(time.time() - self._started, 1),
            "gc": {
                "enabled": gc.isenabled(),
                "counts": list(gc.get_count()),
                "thresholds": list(gc.get_threshold()),
                "generations": gc.get_stats(),
                "frozen": gc.get_freeze_count(),
            },
        }

    async def document(self) -> dict[str, Any]:
        sample = await asyncio.get_running_loop().run_in_executor(None, self.sample)
        doc = {**sample, "sidecar": {**sample["sidecar"], **self.loop_doc()}}
        return doc
