"""Rolling latency percentiles per route label, for unary requests and streams.

`observe` is the hot path: one bucket computation and two dict increments (the
route and ``*``) into the current tick's sub-window. Once a second `tick` pushes the
sub-windows into every rolling window. Queries read the running totals; their result
is cached until the next tick.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .record import CLIENT_DISCONNECT, TimingRecord
from .routes import ALL
from .sketch import (
    INV_LOG_GAMMA,
    MAX_VALUE,
    MIN_VALUE,
    NBUCKETS,
    OFFSET,
    LogHistogram,
    bucket_of,
)
from .timefmt import iso_ms
from .window import RollingHistogram, SubWindow

log = logging.getLogger(__name__)
_log = math.log
_ceil = math.ceil
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.999)
QUANTILE_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms")
Key = tuple[str, bool]  # (route label, stream)


class Tickable(Protocol):
    def tick(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Percentiles of one window, in seconds."""

    count: int
    quantiles: tuple[float, ...]  # aligned with QUANTILES
    max: float

    def value(self, q: float) -> float:
        return self.quantiles[QUANTILES.index(q)]

    def as_json(self) -> dict[str, float | int]:
        if not self.count:
            return {}
        doc: dict[str, float | int] = {"count": self.count}
        for key, v in zip(QUANTILE_KEYS, self.quantiles, strict=True):
            doc[key] = round(v * 1000, 3)
        doc["max_ms"] = round(self.max * 1000, 3)
        return doc


EMPTY = WindowStats(0, tuple(math.nan for _ in QUANTILES), 0.0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every (route, stream) -> {window_s -> WindowStats}, as of one tick."""

    generated_at: float  # wall clock
    windows_s: tuple[int, ...]
    stats: dict[Key, dict[int, WindowStats]]
    totals: dict[Key, tuple[int, float]] = field(default_factory=dict)  # count, sum since start

    def as_json(self) -> dict[str, Any]:
        routes: dict[str, Any] = {}
        streams: dict[str, Any] = {}
        for (route, stream), per_window in sorted(self.stats.items()):
            (streams if stream else routes)[route] = {
                str(w): s.as_json() for w, s in per_window.items()
            }
        return {
            "generated_at": iso_ms(self.generated_at),
            "windows_s": list(self.windows_s),
            "routes": routes,
            "streams": streams,
        }


class Percentiles:
    """The observer. `tick()` once a second (the server's ticker) advances the windows."""

    TICK_S = 1

    def __init__(self, windows_s: list[int]) -> None:
        self.windows_s = tuple(windows_s)
        self._windows: dict[Key, list[RollingHistogram]] = {}
        self._pending: dict[Key, SubWindow] = {}
        self._totals: dict[Key, tuple[int, float]] = {}  # count, sum since start
        self._snapshot: Snapshot | None = None  # last computed
        self._fresh = False  # computed since the last tick
        # called by `tick` with the sub-windows it closed (the fleet view shares them)
        self.tick_hooks: list[Callable[[Mapping[Key, SubWindow]], None]] = []
        # what must advance with these windows, in the same tick (anatomy/: time to
        # first token, per output token, upstream, overhead)
        self.linked: list[Tickable] = []

    def observe(self, record: TimingRecord) -> None:
        if record.error == CLIENT_DISCONNECT:
            return  # never completed: no latency to speak of
        seconds = record.latency
        bucket = bucket_of(seconds)
        pending = self._pending
        stream = record.stream
        for key in ((record.route, stream), (ALL, stream)):
            sub = pending.get(key)
            if sub is None:
                sub = pending[key] = SubWindow()
            counts = sub.counts  # SubWindow.add, inlined: this runs per request
            counts[bucket] = counts.get(bucket, 0) + 1
            sub.count += 1
            sub.sum += seconds
            if seconds > sub.max:
                sub.max = seconds

    def add(self, route: str, stream: bool, seconds: float) -> None:
        """One value of another kind than a record's latency, under (route, stream)
        and (``*``, stream)."""
        bucket = bucket_of(seconds)
        pending = self._pending
        for key in ((route, stream), (ALL, stream)):
            sub = pending.get(key)
            if sub is None:
                sub = pending[key] = SubWindow()
            counts = sub.counts
            counts[bucket] = counts.get(bucket, 0) + 1
            sub.count += 1
            if seconds > sub.max:
                sub.max = seconds

    def add_key(self, key: Key, seconds: float) -> None:
        """One value under ``key`` only (no ``*``: `merged` computes it when asked).
        Per request: `sketch.bucket_of` inlined."""
        if seconds <= MIN_VALUE:
            bucket = 0
        elif seconds >= MAX_VALUE:
            bucket = NBUCKETS - 1
        else:
            bucket = _ceil(_log(seconds) * INV_LOG_GAMMA) - OFFSET
        sub = self._pending.get(key)
        if sub is None:
            sub = self._pending[key] = SubWindow()
        counts = sub.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        sub.count += 1
        if seconds > sub.max:
            sub.max = seconds

    def pending(self, key: Key) -> SubWindow:
        """The current sub-window of ``key`` only (as `add_key`), for values already
        bucketed: add to its counts, count and max."""
        sub = self._pending.get(key)
        if sub is None:
            sub = self._pending[key] = SubWindow()
        return sub

    def merged(self, stream: bool, window_s: int) -> WindowStats:
        """Percentiles of every route's window of one kind together (for values kept
        with `add_key`): the ``*`` view, computed on demand."""
        total = LogHistogram()
        for (route, kind), windows in self._windows.items():
            if kind != stream or route == ALL:
                continue
            for window in windows:
                if window.window_s == window_s and not window.empty:
                    total.merge(window.totals)
                    total.max = max(total.max, window.max)
        if not total.count:
            return EMPTY
        return WindowStats(total.count, tuple(total.quantiles(QUANTILES)), total.max)

    def tick(self) -> None:
        """Close the current sub-window: push it into every rolling window."""
        for other in self.linked:
            other.tick()
        pending, self._pending = self._pending, {}
        totals = self._totals
        for key, sub in pending.items():
            if key not in self._windows:
                self._windows[key] = [RollingHistogram(w, self.TICK_S) for w in self.windows_s]
            count, total = totals.get(key, (0, 0.0))
            totals[key] = (count + sub.count, total + sub.sum)
        for key, windows in self._windows.items():
            closed = pending.get(key)
            for window in windows:
                window.push(closed)
        self._fresh = False
        for hook in self.tick_hooks:
            try:
                hook(pending)
            except Exception:  # a hook must not stop the windows from advancing
                log.exception("percentile tick hook failed")

    def snapshot(self) -> Snapshot:
        """Percentiles of every route and window; cached until the next tick."""
        snap = self._snapshot
        if snap is None or not self._fresh:
            stats: dict[Key, dict[int, WindowStats]] = {}
            for key, windows in self._windows.items():
                stats[key] = {
                    w.window_s: (
                        EMPTY
                        if w.empty
                        else WindowStats(w.count, tuple(w.quantiles(QUANTILES)), w.max)
                    )
                    for w in windows
                }
            snap = self._snapshot = Snapshot(time.time(), self.windows_s, stats, dict(self._totals))
            self._fresh = True
        return snap

    @property
    def last_snapshot(self) -> Snapshot | None:
        """The last computed snapshot, never computing: safe from another thread."""
        return self._snapshot
