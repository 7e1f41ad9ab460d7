"""The fleet window: the sum of every sidecar's sub-windows, as read from the store.

Each window is the settled slots ``[hi - n + 1, hi]`` (see `layout`). A refresh reads
only the slots it does not hold yet (one per second in steady state, the whole window
after a start or a gap) and those a sidecar wrote to after they settled (it was slow,
or Redis was: the store marks such late writes), adds them to running totals and
subtracts the slots that left the window, exactly as the local engine does: a query
costs the same whatever the number of sidecars. When the store cannot be read the
view keeps its last state, and ``stale_s`` says how old it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..percentiles import EMPTY, QUANTILES, Key, Snapshot, WindowStats
from ..sketch import LogHistogram, quantiles_from_counts
from ..window import SubWindow
from .layout import settled_slot, slot_seconds, slots_in
from .store import FleetError, FleetStore

log = logging.getLogger(__name__)
SLOTS_PER_READ = 6  # slots per round trip of a first read (then the loop runs again)
MAX_KEYS = 1000  # route labels x kinds across the fleet (each sidecar caps its own)


class FleetWindow:
    """One window of the fleet: settled slots, summed per (route, stream)."""

    def __init__(self, window_s: int) -> None:
        self.window_s = window_s
        self.n = slots_in(window_s)
        self.slots: dict[int, dict[Key, SubWindow]] = {}
        self.marks: dict[int, frozenset[str]] = {}  # late writes seen when a slot was read
        self.totals: dict[Key, LogHistogram] = {}

    @property
    def start(self) -> float:
        """Wall time the window's oldest slot starts at (0 before the first read)."""
        return min(self.slots, default=0) * slot_seconds(self.window_s)

    def wanted(self, hi: int, marks: dict[int, frozenset[str]]) -> list[int]:
        """Slots to read: new ones, and those written to since they were read."""
        return [
            s
            for s in range(hi - self.n + 1, hi + 1)
            if s not in self.slots or marks.get(s, frozenset()) != self.marks.get(s, frozenset())
        ]

    def _drop(self, s: int) -> None:
        self.marks.pop(s, None)
        for key, sub in self.slots.pop(s).items():
            total = self.totals[key]
            total.subtract_sparse(sub.counts)
            if total.count <= 0:
                del self.totals[key]

    def advance(
        self, hi: int, read: dict[int, dict[Key, SubWindow]], marks: dict[int, frozenset[str]]
    ) -> None:
        lo = hi - self.n + 1
        for s in [s for s in self.slots if s < lo]:
            self._drop(s)
        for s, subs in read.items():
            if s < lo or s > hi:
                continue
            if s in self.slots:
                self._drop(s)  # read again: replaced by what the store holds now
            self.marks[s] = marks.get(s, frozenset())
            kept: dict[Key, SubWindow] = {}
            for key, sub in subs.items():
                if key not in self.totals:
                    if len(self.totals) >= MAX_KEYS:
                        continue
                    self.totals[key] = LogHistogram()
                self.totals[key].add_sparse(sub.counts)
                kept[key] = sub
            self.slots[s] = kept

    def stats(self, key: Key) -> WindowStats:
        total = self.totals.get(key)
        if total is None or total.count <= 0:
            return EMPTY
        vmax = max((subs[key].max for subs in self.slots.values() if key in subs), default=0.0)
        qs = quantiles_from_counts(total.counts, total.count, QUANTILES, vmax or None)
        return WindowStats(total.count, tuple(qs), vmax)


class FleetView:
    """The fleet's percentiles for every route and window, refreshed from the store."""

    def __init__(
        self,
        store: FleetStore,
        fleet: str,
        windows_s: Sequence[int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.fleet = fleet
        self.windows_s = tuple(sorted(windows_s))
        self._clock = clock
        self.windows = [FleetWindow(w) for w in self.windows_s]
        self.instances: list[str] = []
        self.pods: dict[Key, int] = {}
        self.read_at: float | None = None  # wall time of the last successful refresh
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read what is new; raises `FleetError` (the view then keeps its last state).

        A first read takes whole windows: it goes in groups of slots, yielding to the
        event loop between them, so proxied requests on this sidecar never wait long;
        an interrupted read keeps what it got and the next one goes on from there. The
        snapshot changes only when a refresh completes."""
        async with self._lock:
            now = self._clock()
            keys: set[Key] = set()
            for fw in self.windows:
                hi = settled_slot(now, fw.window_s)
                marks = await self._store.late_marks(fw.window_s, hi - fw.n + 1, hi)
                wanted = fw.wanted(hi, marks)
                for i in range(0, max(1, len(wanted)), SLOTS_PER_READ):
                    group = wanted[i : i + SLOTS_PER_READ]
                    fw.advance(hi, await self._store.read_slots(fw.window_s, group), marks)
                    await asyncio.sleep(0)
                keys |= set(fw.totals)
            # alive: shared within the shortest window; pods: had requests in it
            first = self.windows[0]
            self.instances, self.pods = await self._store.members(
                now - first.window_s - 1.0, first.start, sorted(keys)
            )
            self.read_at = now
            self._snapshot = self._compute()

    async def fresh(self, max_age_s: float = 1.0, timeout_s: float = 1.5) -> None:
        """Refresh unless a refresh is at most ``max_age_s`` old; never raises."""
        if self.read_at is not None and self._clock() - self.read_at < max_age_s:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.refresh()
        except (FleetError, TimeoutError) as exc:
            log.debug("fleet view not refreshed: %s", exc)

    @property
    def stale_s(self) -> float | None:
        return None if self.read_at is None else max(0.0, self._clock() - self.read_at)

    def _compute(self) -> Snapshot:
        keys = set().union(*(fw.totals for fw in self.windows))
        stats = {key: {fw.window_s: fw.stats(key) for fw in self.windows} for key in keys}
        return Snapshot(self.read_at or 0.0, self.windows_s, stats)

    def snapshot(self) -> Snapshot:
        """As of the last completed refresh (empty before the first)."""
        if self._snapshot is None:
            return Snapshot(0.0, self.windows_s, {})
        return self._snapshot

    def as_json(self) -> dict[str, Any]:
        """The `/percentiles` document of the fleet, plus who is in it and its age."""
        doc = self.snapshot().as_json()
        stale = self.stale_s
        doc.update(
            fleet=self.fleet,
            instances=list(self.instances),
            stale_s=None if stale is None else round(stale, 1),
        )
        return doc
