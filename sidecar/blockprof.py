"""Block profile of the event loop: which code held the loop longer than a threshold.

Python's counterpart of Go's block profile. Two parts, both only while a profile runs:

- a heartbeat on the loop: a timer every `threshold / 4` that stamps when it ran and
  how late (a loop that is held cannot run its timers, so the lateness of the beat is
  the time it was held, within one beat period below the truth);
- a watchdog thread that sleeps until the next beat is due and, while a beat is
  overdue, samples the loop thread's Python stack (`sys._current_frames()`) every
  `SAMPLE_INTERVAL_S`. When the late beat finally runs and was later than the
  threshold, the stall is recorded and its time is shared out between the stacks
  sampled during it.

Samples that show the loop idle (waiting in the selector, or no frame above the loop
itself) mean the process was not given the CPU or another thread held the GIL; they
are reported as such, not blamed on code. So is a stall during which the process was
not scheduled (a busy node): the loop thread used less than half of it in CPU time and
the watchdog, which wakes every `SAMPLE_INTERVAL_S`, took less than a quarter of its
samples — whatever code the few samples show was only where the loop was paused. Code
that blocks in a system call (a `time.sleep`, blocking I/O) uses no CPU either, but
leaves the watchdog free to sample: it is blamed, as it should be.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Frame = tuple[str, int, str]  # filename, first line, function
Stack = tuple[Frame, ...]  # outermost first
IDLE: Stack = (("<loop>", 0, "loop idle: process not scheduled or GIL held elsewhere"),)
SAMPLE_INTERVAL_S = 0.002
MIN_BEAT_S = 0.002
NOT_SCHEDULED_CPU = 0.5  # the loop thread's CPU time under this share of the stall ...
NOT_SCHEDULED_SAMPLES = 0.25  # ... and fewer samples than this share of those due


def not_scheduled(stall_s: float, cpu_s: float, taken: int, watched_s: float) -> bool:
    """Was the process not given the CPU for most of a stall of ``stall_s``? The loop
    thread used ``cpu_s`` of CPU meanwhile; the watchdog took ``taken`` samples in the
    ``watched_s`` it watched (module docstring)."""
    due = watched_s / SAMPLE_INTERVAL_S
    return cpu_s < NOT_SCHEDULED_CPU * stall_s and taken < NOT_SCHEDULED_SAMPLES * due


def _stack(frame: Any) -> list[Frame]:
    out: list[Frame] = []
    while frame is not None:
        code = frame.f_code
        out.append((code.co_filename, code.co_firstlineno, code.co_name))
        frame = frame.f_back
    out.reverse()
    return out


@dataclass
class StackStat:
    stalls: int = 0  # stalls during which this stack was seen
    samples: int = 0
    blocked_s: float = 0.0  # stall time attributed to it (its share of the stall's samples)
    max_stall_s: float = 0.0


@dataclass
class BlockProfile:
    seconds: float
    threshold_s: float
    beat_s: float
    stalls: int = 0
    blocked_s: float = 0.0
    max_stall_s: float = 0.0
    unsampled_stalls: int = 0  # stalls too short for the watchdog to see the stack
    stacks: dict[Stack, StackStat] = field(default_factory=dict)

    def add(self, stall_s: float, samples: Counter[Stack]) -> None:
        self.stalls += 1
        self.blocked_s += stall_s
        self.max_stall_s = max(self.max_stall_s, stall_s)
        total = sum(samples.values())
        if not total:
            self.unsampled_stalls += 1
            return
        for stack, n in samples.items():
            stat = self.stacks.setdefault(stack, StackStat())
            stat.stalls += 1
            stat.samples += n
            stat.blocked_s += stall_s * n / total
            stat.max_stall_s = max(stat.max_stall_s, stall_s)

    def ranked(self) -> list[tuple[Stack, StackStat]]:
        return sorted(self.stacks.items(), key=lambda kv: kv[1].blocked_s, reverse=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "threshold_ms": round(self.threshold_s * 1000, 3),
            "heartbeat_ms": round(self.beat_s * 1000, 3),
            "stalls": self.stalls,
            "blocked_ms": round(self.blocked_s * 1000, 3),
            "max_stall_ms": round(self.max_stall_s * 1000, 3),
            "unsampled_stalls": self.unsampled_stalls,
            "stacks": [
                {
                    "stalls": s.stalls,
                    "samples": s.samples,
                    "blocked_ms": round(s.blocked_s * 1000, 3),
                    "max_stall_ms": round(s.max_stall_s * 1000, 3),
                    "idle": stack == IDLE,
                    "frames": [label(f) for f in stack],
                }
                for stack, s in self.ranked()
            ],
        }

    def text(self) -> str:
        lines = [
            f"block profile of the event loop: {self.stalls} stalls longer than "
            f"{self.threshold_s * 1000:g} ms in {self.seconds:g} s, "
            f"{self.blocked_s * 1000:.1f} ms blocked in total, longest "
            f"{self.max_stall_s * 1000:.1f} ms (heartbeat every {self.beat_s * 1000:g} ms; "
            f"{self.unsampled_stalls} stalls ended before a stack was sampled)",
            "",
        ]
        for stack, s in self.ranked():
            lines.append(
                f"--- {s.blocked_s * 1000:.1f} ms blocked, {s.stalls} stalls, longest "
                f"{s.max_stall_s * 1000:.1f} ms, {s.samples} samples"
            )
            lines += [f"  {label(f)}" for f in reversed(stack)]  # innermost first
            lines.append("")
        return "\n".join(lines) + "\n"


def label(frame: Frame) -> str:
    filename, line, name = frame
    if filename == "<loop>":
        return name
    short = filename.rsplit("site-packages/", 1)[-1].rsplit("/lib/python", 1)[-1]
    return f"{name} ({short}:{line})"


class BlockProfiler:
    """One profile run: `await run(seconds)` on the loop it watches."""

    def __init__(self, loop_thread: int, threshold_s: float) -> None:
        self.loop_thread = loop_thread
        self.threshold_s = threshold_s
        self.beat_s = max(MIN_BEAT_S, threshold_s / 4)
        # (sequence, monotonic time the beat ran, how late it ran): replaced as a whole
        # by the loop, read by the watchdog (a tuple assignment is atomic)
        self._beat: tuple[int, float, float] = (0, time.monotonic(), 0.0)
        self._idle_base: tuple[Frame, ...] = ()
        self._stop = threading.Event()

    def _on_beat(self, loop: asyncio.AbstractEventLoop, expected: float) -> None:
        now = loop.time()
        if not self._idle_base:
            # the loop's own frames below this callback: a sample equal to a prefix of
            # them is the loop waiting for I/O, not code holding it
            self._idle_base = tuple(_stack(sys._getframe(1)))
        seq = self._beat[0] + 1
        self._beat = (seq, time.monotonic(), max(0.0, now - expected))
        if not self._stop.is_set():
            loop.call_at(now + self.beat_s, self._on_beat, loop, now + self.beat_s)

    def _idle(self, stack: list[Frame]) -> bool:
        if not stack:
            return True
        if stack[-1][0].endswith("selectors.py"):  # asyncio's loop waiting in select()
            return True
        if stack[-1][2] == "_on_beat" and stack[-1][0] == __file__:  # the late beat itself
            return True
        base = self._idle_base
        return bool(base) and len(stack) <= len(base) and tuple(stack) == base[: len(stack)]

    def _loop_cpu(self) -> float | None:
        """The loop thread's CPU time so far (None where the OS cannot tell)."""
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.loop_thread))
        except (AttributeError, OSError):
            return None

    def _not_scheduled(self, stall_s: float, taken: int, cpu: float | None, since: float) -> bool:
        if cpu is None or (used := self._loop_cpu()) is None:
            return False
        return not_scheduled(stall_s, used - cpu, taken, time.monotonic() - since)

    def _watch(self, profile: BlockProfile) -> None:
        samples: Counter[Stack] = Counter()
        seen = self._beat[0]
        cpu: float | None = None  # the loop thread's CPU time when sampling began
        since = 0.0  # ... and when that was
        while not self._stop.is_set():
            seq, at, late = self._beat
            if seq != seen:  # a beat ran: close the episode it ended
                seen = seq
                if late >= self.threshold_s:
                    taken = sum(samples.values())
                    if taken and self._not_scheduled(late, taken, cpu, since):
                        samples = Counter({IDLE: taken})
                    profile.add(late, samples)
                samples = Counter()
            now = time.monotonic()
            due = at + self.beat_s + SAMPLE_INTERVAL_S
            if now < due:
                self._stop.wait(due - now)
                continue
            if not samples:
                cpu, since = self._loop_cpu(), now
            frame = sys._current_frames().get(self.loop_thread)
            stack = _stack(frame)
            samples[IDLE if self._idle(stack) else tuple(stack)] += 1
            del frame
            self._stop.wait(SAMPLE_INTERVAL_S)
        seq, _, late = self._beat
        if seq != seen and late >= self.threshold_s:  # a stall that ended with the run
            profile.add(late, samples)

    async def run(self, seconds: float) -> BlockProfile:
        loop = asyncio.get_running_loop()
        profile = BlockProfile(seconds, self.threshold_s, self.beat_s)
        self._beat = (0, time.monotonic(), 0.0)
        start = loop.time()
        handle = loop.call_at(start + self.beat_s, self._on_beat, loop, start + self.beat_s)
        watchdog = threading.Thread(
            target=self._watch, args=(profile,), name="block-profile", daemon=True
        )
        watchdog.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._stop.set()
            handle.cancel()
            await asyncio.to_thread(watchdog.join)
        return profile
