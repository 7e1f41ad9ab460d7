"""Sliding-window histograms: a ring of sparse sub-window histograms with running
dense totals. Adding a sub-window adds its counts, expiring one subtracts them, so a
query costs the same whatever the traffic or the window length."""

from __future__ import annotations

from .sketch import LogHistogram, quantiles_from_counts

SLOTS_PER_WINDOW = 60


class SubWindow:
    """What one tick (1 s) collected: sparse bucket counts, the exact max and sum."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.max = 0.0
        self.sum = 0.0

    def add(self, bucket: int, seconds: float) -> None:
        counts = self.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds


class RollingHistogram:
    """The last ``window_s`` seconds, as ``SLOTS_PER_WINDOW`` slots of
    ``window_s / SLOTS_PER_WINDOW`` seconds (at least one tick each).

    `push` is called once per tick with what that tick collected (possibly nothing);
    a slot whose time has passed is subtracted from the totals. The window therefore
    covers between ``window_s - slot_s`` and ``window_s`` seconds of history.
    """

    def __init__(self, window_s: int, tick_s: int = 1) -> None:
        self.window_s = window_s
        self.ticks_per_slot = max(1, window_s // (SLOTS_PER_WINDOW * tick_s))
        nslots = max(1, window_s // (self.ticks_per_slot * tick_s))
        self._slots: list[SubWindow | None] = [None] * nslots  # allocated when used
        self._pos = 0
        self._ticks = 0
        self.totals = LogHistogram()

    def push(self, sub: SubWindow | None) -> None:
        if sub is not None and sub.count:
            if self.ticks_per_slot == 1:
                # a slot per tick: the sub-window itself, by reference (never changed
                # once pushed), instead of a copy
                self._slots[self._pos] = sub
            else:  # several ticks per slot: merged, so memory stays one dict per slot
                slot = self._slots[self._pos]
                if slot is None:
                    slot = self._slots[self._pos] = SubWindow()
                counts = slot.counts
                for bucket, n in sub.counts.items():
                    counts[bucket] = counts.get(bucket, 0) + n
                slot.count += sub.count
                slot.max = max(slot.max, sub.max)
            self.totals.add_sparse(sub.counts, sub.count)
        self._ticks += 1
        if self._ticks >= self.ticks_per_slot:
            self._ticks = 0
            self._pos = (self._pos + 1) % len(self._slots)
            expired = self._slots[self._pos]
            if expired is not None:
                self.totals.subtract_sparse(expired.counts, expired.count)
                self._slots[self._pos] = None

    @property
    def count(self) -> int:
        return self.totals.count

    @property
    def max(self) -> float:
        return max((slot.max for slot in self._slots if slot is not None), default=0.0)

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        return quantiles_from_counts(self.totals.counts, self.totals.count, qs, self.max)

    @property
    def empty(self) -> bool:
        return self.totals.count == 0
