"""The profiling listener: off by default, on its own port, bearer-token protected.

CPU profiles come from a sampling thread (`sys._current_frames()` every 5 ms), not
from cProfile: the event loop keeps running at full speed while it is profiled, and
the samples give both a pstats-style table and folded stacks for flame graphs.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import sys
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from aiohttp import web

from .blockprof import BlockProfiler

Frame = tuple[str, int, str]  # filename, first line, function
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_SECONDS = 60
SAMPLE_INTERVAL_S = 0.005
TOP = 40


def sample_stacks(thread_id: int, seconds: float, interval: float) -> Counter[tuple[Frame, ...]]:
    """Sample one thread's Python stack; runs on its own thread."""
    stacks: Counter[tuple[Frame, ...]] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread_id)
        stack: list[Frame] = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_filename, code.co_firstlineno, code.co_name))
            frame = frame.f_back
        if stack:
            stacks[tuple(reversed(stack))] += 1
        time.sleep(interval)
    return stacks


def _label(frame: Frame) -> str:
    filename, line, name = frame
    short = filename.rsplit("site-packages/", 1)[-1].rsplit("/lib/python", 1)[-1]
    return f"{name} ({short}:{line})"


def collapsed(stacks: Counter[tuple[Frame, ...]]) -> str:
    """Folded stacks: ``frame;frame;frame count`` lines (flamegraph.pl, speedscope)."""
    lines = [";".join(_label(f) for f in stack) + f" {n}" for stack, n in stacks.items()]
    return "\n".join(sorted(lines)) + "\n"


def table(stacks: Counter[tuple[Frame, ...]], seconds: float, interval: float) -> str:
    """pstats-style text: functions sorted by cumulative share of samples."""
    total = sum(stacks.values()) or 1
    own: Counter[Frame] = Counter()
    cum: Counter[Frame] = Counter()
    for stack, n in stacks.items():
        own[stack[-1]] += n
        for frame in set(stack):
            cum[frame] += n
    out = io.StringIO()
    out.write(
        f"CPU profile of the event-loop thread: {total} samples over {seconds:g} s "
        f"(every {interval * 1000:g} ms)\nsorted by cumulative share; "
        f"self = samples with the function on top of the stack\n\n"
        f"{'cum%':>6} {'cum_s':>7} {'self%':>6} {'self_s':>7}  function\n"
    )
    for frame, n in cum.most_common(TOP * 2):
        out.write(
            f"{n / total * 100:6.1f} {n * interval:7.3f} {own[frame] / total * 100:6.1f} "
            f"{own[frame] * interval:7.3f}  {_label(frame)}\n"
        )
    return out.getvalue()


def await_chain(coro: object) -> list[FrameType]:
    """The frames of a suspended task, outermost first, following ``cr_await`` (a
    task's `get_stack()` shows only its outermost coroutine)."""
    frames: list[FrameType] = []
    seen = 0
    while coro is not None and seen < 100:
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            frame = getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return frames


def _seconds(request: web.Request, default: float) -> float:
    raw = request.query.get("seconds", str(default))
    try:
        seconds = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"seconds must be a number, got {raw!r}\n") from None
    if not 0 < seconds <= MAX_SECONDS:
        raise web.HTTPBadRequest(text=f"seconds must be in (0, {MAX_SECONDS}]\n")
    return seconds


class Profiler:
    def __init__(self, token: str, runtime: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._token = f"Bearer {token}".encode()
        self._runtime = runtime
        self._busy = asyncio.Lock()  # one CPU/heap profile at a time
        self._block_busy = asyncio.Lock()  # one block profile at a time
        self._loop_thread = threading.get_ident()  # replaced in app(), on the loop thread

    @property
    def busy(self) -> bool:
        """A CPU or heap profile is being taken."""
        return self._busy.locked()

    @property
    def block_busy(self) -> bool:
        """A block profile is being taken."""
        return self._block_busy.locked()

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # the header as the client sent it: non-UTF-8 bytes must fail the compare,
        # not the encoding (surrogateescape restores the original bytes)
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._token):
            raise web.HTTPUnauthorized(
                text="bearer token required\n", headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    def app(self) -> web.Application:
        self._loop_thread = threading.get_ident()
        app = web.Application(middlewares=[self.auth])
        r = app.router
        r.add_get("/debug/pprof/cpu", self.cpu)
        r.add_get("/debug/pprof/block", self.block)
        r.add_get("/debug/pprof/heap", self.heap)
        r.add_get("/debug/pprof/allocs", self.allocs)
        r.add_get("/debug/pprof/tasks", self.tasks)
        r.add_get("/debug/pprof/threads", self.threads)
        r.add_get("/debug/pprof/gc", self.gc)
        r.add_get("/debug/runtime", self.runtime)
        return app

    async def cpu(self, request: web.Request) -> web.Response:
        seconds = _seconds(request, 10)
        fmt = request.query.get("format", "text")
        if fmt not in ("text", "collapsed"):
            raise web.HTTPBadRequest(text="format is text or collapsed\n")
        if self._busy.locked():
            raise web.HTTPConflict(text="a CPU profile is already running\n")
        async with self._busy:
            stacks = await asyncio.to_thread(
                sample_stacks, self._loop_thread, seconds, SAMPLE_INTERVAL_S
            )
        body = (
            collapsed(stacks) if fmt == "collapsed" else table(stacks, seconds, SAMPLE_INTERVAL_S)
        )
        return web.Response(text=body)

    async def block(self, request: web.Request) -> web.Response:
        seconds = _seconds(request, 10)
        raw = request.query.get("threshold_ms", "20")
        try:
            threshold_ms = float(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"threshold_ms must be a number, got {raw!r}\n") from None
        if not 1 <= threshold_ms <= 10_000:
            raise web.HTTPBadRequest(text="threshold_ms must be in [1, 10000]\n")
        fmt = request.query.get("format", "text")
        if fmt not in ("text", "json"):
            raise web.HTTPBadRequest(text="format is text or json\n")
        if self._block_busy.locked():
            raise web.HTTPConflict(text="a block profile is already running\n")
        async with self._block_busy:
            profile = await BlockProfiler(self._loop_thread, threshold_ms / 1000).run(seconds)
        if fmt == "json":
            return web.json_response(profile.as_json())
        return web.Response(text=profile.text())

    @staticmethod
    def _ensure_tracing() -> str:
        if tracemalloc.is_tracing():
            return ""
        tracemalloc.start(16)
        return (
            "tracemalloc was off and has been started now: only allocations made from now "
            "on are traced (tracing costs memory and CPU until the process restarts)\n\n"
        )

    async def heap(self, request: web.Request) -> web.Response:
        note = self._ensure_tracing()
        snap = await asyncio.to_thread(tracemalloc.take_snapshot)
        stats = snap.statistics("lineno")
        current, peak = tracemalloc.get_traced_memory()
        lines = [
            note + f"traced memory: current {current / 2**20:.1f} MiB, peak "
            f"{peak / 2**20:.1f} MiB; top {TOP} allocation sites by size:\n"
        ]
        lines += [str(s) for s in stats[:TOP]]
        return web.Response(text="\n".join(lines) + "\n")

    async def allocs(self, request: web.Request) -> web.Response:
        seconds = _seconds(request, 10)
        note = self._ensure_tracing()
        before = await asyncio.to_thread(tracemalloc.take_snapshot)
        await asyncio.sleep(seconds)
        after = await asyncio.to_thread(tracemalloc.take_snapshot)
        diff = after.compare_to(before, "lineno")
        lines = [note + f"allocation growth over {seconds:g} s, top {TOP} sites:\n"]
        lines += [str(s) for s in diff[:TOP]]
        return web.Response(text="\n".join(lines) + "\n")

    async def tasks(self, request: web.Request) -> web.Response:
        out = io.StringIO()
        tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
        out.write(f"{len(tasks)} asyncio tasks\n\n")
        for task in tasks:
            state = "done" if task.done() else "pending"
            out.write(f"--- {task.get_name()} [{state}] {task.get_coro()!r}\n")
            for frame in await_chain(task.get_coro()):
                code = frame.f_code
                out.write(
                    f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
                )
            out.write("\n")
        return web.Response(text=out.getvalue())

    async def threads(self, request: web.Request) -> web.Response:
        frames = sys._current_frames()
        out = io.StringIO()
        for thread in threading.enumerate():
            out.write(f"--- {thread.name} (ident {thread.ident}, daemon={thread.daemon})\n")
            frame = frames.get(thread.ident or -1)
            if frame is not None:
                out.write("".join(traceback.format_stack(frame)))
            out.write("\n")
        return web.Response(text=out.getvalue())

    async def gc(self, request: web.Request) -> web.Response:
        doc: dict[str, Any] = {
            "enabled": gc.isenabled(),
            "counts": list(gc.get_count()),
            "thresholds": list(gc.get_threshold()),
            "generations": gc.get_stats(),
            "frozen": gc.get_freeze_count(),
            "garbage": len(gc.garbage),
        }
        if request.query.get("objects") == "1":  # walks the whole heap: opt in
            types = Counter(type(o).__name__ for o in gc.get_objects())
            doc["top_types"] = dict(types.most_common(TOP))
        return web.json_response(doc)

    async def runtime(self, request: web.Request) -> web.Response:
        return web.json_response(await self._runtime())
