"""Block profile of the event loop: which code held the loop longer than a threshold.

Python's counterpart of Go's block profile. Two parts, both only while a profile runs:

- a heartbeat on the loop: a timer every `threshold / 4` that stamps when it ran and
  how late (a loop that is held cannot run its timers, so the lateness of the beat is
  the time it was held, within one beat period below the truth); each beat also notes
  what happened since the previous one: the loop thread's CPU time and its time
  runnable but waiting for a CPU (Linux schedstat), and the garbage collector's CPU
  time (`gc.callbacks`, any thread: a collection holds the GIL, so the loop too);
- a watchdog thread that sleeps until the next beat is due and, while a beat is
  overdue, samples the loop thread's Python stack (`sys._current_frames()`) every
  `SAMPLE_INTERVAL_S`. When the late beat finally runs and was later than the
  threshold, the stall is recorded and its time is shared out between the stacks
  sampled during it.

Not every stall is code's doing, and those that are not are given, whole, to what
held the loop (`owner`), whatever the samples show:

- the collector used at least the threshold in CPU time since the previous beat: it
  alone held the loop that long, and the stall is its (`GC`) — however long a busy
  node stretched it. A collection's stack shows only the code that allocated the
  object that set it off;
- the collector and the wait for a CPU took at least half of the time since the
  previous beat: the stall is the collector's or the scheduler's (`IDLE`), whichever
  took more;
- the loop thread used less than half of that time in CPU and the watchdog, which
  wakes every `SAMPLE_INTERVAL_S`, got less than a quarter of its samples: the process
  was stopped or starved (`IDLE`); the few samples show only where the loop was paused;
- samples that show the loop waiting in the selector (or no frame above the loop
  itself) are `IDLE` too.

Code that blocks in a system call (a `time.sleep`, blocking I/O) uses no CPU either,
but leaves the watchdog free to sample: it is blamed, as it should be.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Frame = tuple[str, int, str]  # filename, first line, function
Stack = tuple[Frame, ...]  # outermost first
IDLE: Stack = (("<loop>", 0, "loop idle: process not scheduled or GIL held elsewhere"),)
GC: Stack = (("<gc>", 0, "garbage collection held the loop"),)
SAMPLE_INTERVAL_S = 0.002
MIN_BEAT_S = 0.002
NOT_CODE_SHARE = 0.5  # the collector and the wait for a CPU took this share: not code
NOT_SCHEDULED_CPU = 0.5  # the loop thread's CPU time under this share of the time ...
NOT_SCHEDULED_SAMPLES = 0.25  # ... and fewer samples than this share of those due


@dataclass(frozen=True)
class Beat:
    """One heartbeat, and what the loop thread did since the previous one."""

    seq: int
    at: float  # time.monotonic() when it ran
    late: float  # how much later than due it ran: the stall, if over the threshold
    span: float  # time since the previous beat (a beat period plus ``late``)
    cpu_s: float  # the loop thread's CPU time in ``span``
    wait_s: float | None  # its time runnable but waiting for a CPU (None: unknown)
    gc_s: float  # CPU time of the garbage collector (in any thread: it holds the GIL)


def owner(beat: Beat, taken: int, threshold_s: float) -> Stack | None:
    """Who held the loop through the stall ``beat`` ended, when it was not code: the
    collector (`GC`) or the scheduler (`IDLE`); None when it was code, which the
    ``taken`` samples name (module docstring)."""
    span, gc_s, wait_s = beat.span, beat.gc_s, beat.wait_s or 0.0
    if gc_s >= threshold_s:  # the collector alone held the loop past the threshold
        return GC
    if gc_s + wait_s >= NOT_CODE_SHARE * span:
        return GC if gc_s >= wait_s else IDLE
    due = beat.late / SAMPLE_INTERVAL_S
    if beat.cpu_s < NOT_SCHEDULED_CPU * span and taken < NOT_SCHEDULED_SAMPLES * due:
        return IDLE  # neither running nor sampled: the process was stopped or starved
    return None


def _run_delay(fd: int | None) -> float | None:
    """The calling thread's time waiting for a CPU so far, from its open
    ``/proc/thread-self/schedstat`` (None where there is none)."""
    if fd is None:
        return None
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _open_schedstat() -> int | None:
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None


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

    def add(self, stall_s: float, samples: Counter[Stack], held_by: Stack | None = None) -> None:
        """A stall and the stacks sampled during it; ``held_by`` (the collector, the
        scheduler) takes the whole stall whatever the samples show."""
        self.stalls += 1
        self.blocked_s += stall_s
        self.max_stall_s = max(self.max_stall_s, stall_s)
        total = sum(samples.values())
        if held_by is not None:
            samples = Counter({held_by: total})
        elif not total:
            self.unsampled_stalls += 1
            return
        for stack, n in samples.items():
            stat = self.stacks.setdefault(stack, StackStat())
            stat.stalls += 1
            stat.samples += n
            stat.blocked_s += stall_s * n / total if total else stall_s
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
                    "gc": stack == GC,
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
    if (frame,) in (IDLE, GC):
        return name
    short = filename.rsplit("site-packages/", 1)[-1].rsplit("/lib/python", 1)[-1]
    return f"{name} ({short}:{line})"


class BlockProfiler:
    """One profile run: `await run(seconds)` on the loop it watches."""

    def __init__(self, loop_thread: int, threshold_s: float) -> None:
        self.loop_thread = loop_thread
        self.threshold_s = threshold_s
        self.beat_s = max(MIN_BEAT_S, threshold_s / 4)
        # the last beat: replaced as a whole by the loop, read by the watchdog (an
        # attribute assignment is atomic)
        self._beat = Beat(0, time.monotonic(), 0.0, 0.0, 0.0, None, 0.0)
        self._handle: asyncio.TimerHandle | None = None  # the next beat
        self._idle_base: tuple[Frame, ...] = ()
        self._stop = threading.Event()
        # the loop thread's clocks at the last beat: CPU, waiting for a CPU, collector
        self._schedstat: int | None = None
        self._cpu = 0.0
        self._wait: float | None = None
        self._gc_total = 0.0  # the collector's CPU time, any thread (one runs at a time)
        self._gc_at = 0.0
        self._gc_began = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # the CPU clock of the collecting thread: a collection the OS paused (a stopped
        # or throttled process) does not count the pause
        if phase == "start":
            self._gc_began = time.thread_time()
        else:
            self._gc_total += max(0.0, time.thread_time() - self._gc_began)

    def _mark(self) -> tuple[float, float | None, float]:
        """Since the last call (in the loop thread): its CPU time, its wait for a CPU,
        the collector's CPU time."""
        cpu, wait, gc_total = time.thread_time(), _run_delay(self._schedstat), self._gc_total
        spent = (
            cpu - self._cpu,
            None if wait is None or self._wait is None else wait - self._wait,
            gc_total - self._gc_at,
        )
        self._cpu, self._wait, self._gc_at = cpu, wait, gc_total
        return spent

    def _on_beat(self, loop: asyncio.AbstractEventLoop, expected: float) -> None:
        now = loop.time()
        if not self._idle_base:
            # the loop's own frames below this callback: a sample equal to a prefix of
            # them is the loop waiting for I/O, not code holding it
            self._idle_base = tuple(_stack(sys._getframe(1)))
        cpu, wait, gc_s = self._mark()
        at, last = time.monotonic(), self._beat
        self._beat = Beat(last.seq + 1, at, max(0.0, now - expected), at - last.at, cpu, wait, gc_s)
        if not self._stop.is_set():
            self._handle = loop.call_at(now + self.beat_s, self._on_beat, loop, now + self.beat_s)

    def _idle(self, stack: list[Frame]) -> bool:
        if not stack:
            return True
        if stack[-1][0].endswith("selectors.py"):  # asyncio's loop waiting in select()
            return True
        if stack[-1][2] == "_on_beat" and stack[-1][0] == __file__:  # the late beat itself
            return True
        base = self._idle_base
        return bool(base) and len(stack) <= len(base) and tuple(stack) == base[: len(stack)]

    def _close(self, profile: BlockProfile, beat: Beat, samples: Counter[Stack]) -> None:
        if beat.late >= self.threshold_s:
            profile.add(beat.late, samples, owner(beat, sum(samples.values()), self.threshold_s))

    def _watch(self, profile: BlockProfile) -> None:
        samples: Counter[Stack] = Counter()
        seen = self._beat.seq
        while not self._stop.is_set():
            beat = self._beat
            if beat.seq != seen:  # a beat ran: close the episode it ended
                seen = beat.seq
                self._close(profile, beat, samples)
                samples = Counter()
            now = time.monotonic()
            due = beat.at + self.beat_s + SAMPLE_INTERVAL_S
            if now < due:
                self._stop.wait(due - now)
                continue
            frame = sys._current_frames().get(self.loop_thread)
            stack = _stack(frame)
            del frame
            if self._beat.seq == beat.seq:  # else the stall ended meanwhile: not in it
                samples[IDLE if self._idle(stack) else tuple(stack)] += 1
            self._stop.wait(SAMPLE_INTERVAL_S)
        if self._beat.seq != seen:  # a stall that ended with the run
            self._close(profile, self._beat, samples)

    async def run(self, seconds: float) -> BlockProfile:
        loop = asyncio.get_running_loop()
        profile = BlockProfile(seconds, self.threshold_s, self.beat_s)
        watchdog = threading.Thread(
            target=self._watch, args=(profile,), name="block-profile", daemon=True
        )
        self._schedstat = _open_schedstat()  # the loop thread's: opened on the loop
        gc.callbacks.append(self._on_gc)
        try:
            self._mark()
            self._beat = Beat(0, time.monotonic(), 0.0, 0.0, 0.0, None, 0.0)
            start = loop.time()
            self._handle = loop.call_at(
                start + self.beat_s, self._on_beat, loop, start + self.beat_s
            )
            watchdog.start()
            await asyncio.sleep(seconds)
        finally:
            # released before the join, which a second cancellation may cut short
            self._stop.set()
            if self._handle is not None:
                self._handle.cancel()
            gc.callbacks.remove(self._on_gc)
            if self._schedstat is not None:
                os.close(self._schedstat)
                self._schedstat = None
            if watchdog.ident is not None:
                await asyncio.to_thread(watchdog.join)
        return profile
