"""The block profile: /debug/pprof/block names the code that held the event loop."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections import Counter

import aiohttp
import pytest

from sidecar.blockprof import GC, IDLE, Beat, BlockProfile, BlockProfiler, Stack, owner
from sidecar.record import TimingRecord

from .process import spawn_sidecar

TOKEN = "block-" + "k" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class BlockingObserver:
    """A deliberately bad observer (test build only): blocks the loop 100 ms on every
    request to /echo/block."""

    def __init__(self) -> None:
        self.blocked = 0
        self.collected = 0
        self.heap: list[list[int]] = []

    def observe(self, record: TimingRecord) -> None:
        if record.route.startswith("/echo/block"):
            self.blocked += 1
            time.sleep(0.1)
        elif record.route.startswith("/echo/gc"):
            # a full collection over a large heap (`heap`): tens of ms with the loop
            # held, the time spent in the collector, not in this function
            self.collected += 1
            gc.collect()


@pytest.fixture
async def profiled(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(
        url, profiling_enabled=True, profiling_token=TOKEN, profiling_listen="127.0.0.1:0"
    )
    blocker = BlockingObserver()
    sc.proxy.add_observer(blocker)
    async with aiohttp.ClientSession() as client:
        yield sc, blocker, client, f"http://127.0.0.1:{sc.profiling_port}"


async def _traffic(client, base, path, stop, pause):
    while not stop.is_set():
        async with client.get(f"{base}{path}") as r:
            await r.read()
        await asyncio.sleep(pause)


async def _profile_under(
    client, prof, base, path, seconds=1.5, pause=0.01, workers=4, threshold_ms=20
):
    stop = asyncio.Event()
    loaders = [
        asyncio.create_task(_traffic(client, base, path, stop, pause)) for _ in range(workers)
    ]
    try:
        url = f"{prof}/debug/pprof/block?seconds={seconds}&threshold_ms={threshold_ms}&format=json"
        async with client.get(url, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            return await r.json()
    finally:
        stop.set()
        await asyncio.gather(*loaders)


async def test_block_profile_names_the_call_that_held_the_loop(profiled):
    sc, blocker, client, prof = profiled
    base = f"http://127.0.0.1:{sc.proxy_port}"
    doc = await _profile_under(client, prof, base, "/echo/block", pause=0.2, workers=1)
    assert blocker.blocked >= 3
    assert doc["stalls"] >= 3
    top = doc["stacks"][0]
    assert not top["idle"]
    assert "observe (" in top["frames"][-1] and "test_blockprof.py" in top["frames"][-1]
    assert any("sidecar/proxy.py" in f for f in top["frames"])
    # the stall time is the 100 ms sleep, measured within one heartbeat (5 ms) below it
    assert 80 <= top["max_stall_ms"] <= 400
    assert top["blocked_ms"] >= 3 * 80

    async with client.get(
        f"{prof}/debug/pprof/block?seconds=0.5&threshold_ms=20", headers=AUTH
    ) as r:
        text = await r.text()
    assert text.startswith("block profile of the event loop:")


async def test_a_healthy_loop_shows_no_blocked_stack(profiled):
    sc, blocker, client, prof = profiled
    base = f"http://127.0.0.1:{sc.proxy_port}"
    # the blocking case below holds the loop 100 ms at a time; a healthy loop never
    # does, even when a busy machine (this test's client shares the loop) slows it
    doc = await _profile_under(client, prof, base, "/echo/fine", threshold_ms=100)
    assert blocker.blocked == 0
    # nothing in the sidecar held the loop; a stall the OS caused (process not
    # scheduled on a busy machine) shows as idle, one the garbage collector caused
    # (the test process's heap is large) as the collector: never as a code stack
    assert [s for s in doc["stacks"] if not (s["idle"] or s["gc"])] == []


async def test_a_stall_in_the_garbage_collector_is_named_as_such(profiled):
    sc, blocker, client, prof = profiled
    base = f"http://127.0.0.1:{sc.proxy_port}"
    callbacks = list(gc.callbacks)
    blocker.heap = [[] for _ in range(1_500_000)]  # ~45 ms a full collection
    doc = await _profile_under(client, prof, base, "/echo/gc", 2.0, pause=0.2, workers=1)
    blocker.heap = []
    assert blocker.collected >= 3
    (held,) = [s for s in doc["stacks"] if s["gc"]]
    assert held["stalls"] >= 3, doc
    assert held["frames"] == ["garbage collection held the loop"]
    # the collections are the stalls: none of them is blamed on the observer
    assert not any("observe (" in f for s in doc["stacks"] for f in s["frames"]), doc
    # the profile left nothing behind: its collector callback is gone
    assert gc.callbacks == callbacks


async def test_block_profile_needs_the_token_and_runs_one_at_a_time(profiled):
    sc, _, client, prof = profiled
    url = f"{prof}/debug/pprof/block?seconds=1"
    for headers in ({}, {"Authorization": "Bearer " + "x" * 46}, {"Authorization": TOKEN}):
        async with client.get(url, headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Bearer"
    first = asyncio.create_task(client.get(url, headers=AUTH))
    while not sc.profiler.block_busy:  # noqa: ASYNC110 (a lock on another task: polled)
        await asyncio.sleep(0.01)
    async with client.get(url, headers=AUTH) as r:
        assert r.status == 409
        assert "already running" in await r.text()
    # a CPU profile may run beside it: the two rules are separate
    async with client.get(f"{prof}/debug/pprof/cpu?seconds=0.2", headers=AUTH) as r:
        assert r.status == 200
    async with await first as r:
        assert r.status == 200
    # and after it finished, the next one is served
    async with client.get(f"{prof}/debug/pprof/block?seconds=0.1", headers=AUTH) as r:
        assert r.status == 200
    for bad in ("seconds=0", "seconds=61", "threshold_ms=0", "threshold_ms=x", "format=svg"):
        async with client.get(f"{prof}/debug/pprof/block?{bad}", headers=AUTH) as r:
            assert r.status == 400, bad


@pytest.mark.slow
async def test_stalls_the_os_caused_are_not_blamed_on_code(upstream):
    """A busy node deschedules the sidecar mid-request: the stall is real, but no code
    held the loop. The sidecar process is stopped (SIGSTOP) six times for 150 ms while
    it proxies: each stop is a stall, and every one is reported as the loop not being
    scheduled, whatever code the loop happened to be in (a stop usually lands in it)."""
    _, url = upstream
    sc = await spawn_sidecar(url, SIDECAR_PROFILING_ENABLED="true",
                             SIDECAR_PROFILING_TOKEN=TOKEN,
                             SIDECAR_PROFILING_LISTEN="127.0.0.1:0")  # fmt: skip
    try:
        async with aiohttp.ClientSession() as client:
            stop = asyncio.Event()
            loaders = [
                asyncio.create_task(_traffic(client, sc.base, "/echo/fine", stop, 0.0))
                for _ in range(32)  # a loop busy in code, where most stops land
            ]
            url = (f"http://127.0.0.1:{sc.profiling_port}/debug/pprof/block"
                   "?seconds=3&threshold_ms=50&format=json")  # fmt: skip

            async def fetch() -> dict:
                async with client.get(url, headers=AUTH) as r:
                    assert r.status == 200
                    doc: dict = await r.json()
                    return doc

            profile = asyncio.create_task(fetch())
            await asyncio.sleep(0.3)  # the stimulus, in the profile's 3 s: timed stops
            for _ in range(6):
                os.kill(sc.proc.pid, signal.SIGSTOP)
                await asyncio.sleep(0.15)
                os.kill(sc.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.2)
            doc = await profile
            stop.set()
            await asyncio.gather(*loaders)
    finally:
        sc.terminate()
        await sc.wait()
    assert doc["stalls"] >= 4, doc  # each stop, unless the profile began late
    # (a collection in the sidecar is named as the collector's, not code's)
    blamed = [s for s in doc["stacks"] if not (s["idle"] or s["gc"])]
    assert blamed == [], [(s["frames"][-3:], s["max_stall_ms"], s["samples"]) for s in blamed]


def _beat(**kw: float | None) -> Beat:
    """A 100 ms stall after a 25 ms beat period, by CPU-bound code unless ``kw`` says
    otherwise."""
    fields = {"late": 0.1, "span": 0.125, "cpu_s": 0.12, "wait_s": 0.0, "gc_s": 0.0} | kw
    return Beat(seq=1, at=0.0, **fields)  # type: ignore[arg-type]


def _owner(beat: Beat, taken: int) -> Stack | None:
    return owner(beat, taken, threshold_s=0.1)


def test_who_held_the_loop_when_it_was_not_code():
    # CPU-bound code (it holds the GIL: few samples): the CPU time says it ran
    assert _owner(_beat(), 3) is None
    # code blocked in a system call (time.sleep): no CPU, but the watchdog sampled freely
    assert _owner(_beat(cpu_s=0.001), 40) is None
    # the process was stopped: no CPU and the watchdog starved too (50 samples due) ...
    assert _owner(_beat(cpu_s=0.002), 2) is IDLE
    # ... even when the watchdog only woke at the end of it
    assert _owner(_beat(late=0.107, span=0.132, cpu_s=0.003), 1) is IDLE
    # the loop thread waited for a CPU most of the time (schedstat), running a little
    assert _owner(_beat(cpu_s=0.06, wait_s=0.07), 3) is IDLE
    assert _owner(_beat(cpu_s=0.1, wait_s=0.02), 3) is None
    # the collector ran most of it; or it and the wait for a CPU did, it more
    assert _owner(_beat(gc_s=0.08), 1) is GC
    assert _owner(_beat(gc_s=0.04, wait_s=0.03), 1) is GC
    assert _owner(_beat(gc_s=0.03, wait_s=0.04), 1) is IDLE
    assert _owner(_beat(gc_s=0.02), 3) is None
    # a collection as long as the threshold held the loop, however long a busy node
    # stretched it
    assert _owner(_beat(late=0.2, span=0.225, gc_s=0.1, wait_s=0.12), 1) is GC
    # unknown wait (no schedstat): the other rules still apply
    assert _owner(_beat(wait_s=None, gc_s=0.08), 0) is GC


def test_a_stall_given_to_the_collector_keeps_its_samples_honest():
    code: Stack = (("app.py", 1, "handler"),)
    profile = BlockProfile(1.0, 0.02, 0.005)
    profile.add(0.05, Counter({code: 2}), GC)
    profile.add(0.04, Counter(), GC)  # the collector held the GIL: nothing sampled
    profile.add(0.03, Counter())
    profile.add(0.06, Counter({code: 1, IDLE: 1}))
    (gc_held, coded, idle) = profile.as_json()["stacks"]
    assert gc_held["gc"] and gc_held["stalls"] == 2 and gc_held["samples"] == 2
    assert gc_held["blocked_ms"] == 90.0
    assert coded["frames"] == ["handler (app.py:1)"] and coded["blocked_ms"] == 30.0
    assert idle["idle"] and idle["blocked_ms"] == 30.0
    assert profile.unsampled_stalls == 1 and profile.stalls == 4


async def test_the_loop_threads_clocks_are_read_as_they_are():
    profiler = BlockProfiler(0, 0.02)
    gc.callbacks.append(profiler._on_gc)
    try:
        profiler._mark()
        keep: list[list[int]] = [[] for _ in range(300_000)]
        gc.collect()
        cpu, wait, gc_s = profiler._mark()
    finally:
        gc.callbacks.remove(profiler._on_gc)
    del keep
    assert 0 < gc_s <= cpu  # the collection ran in this thread, on its CPU clock
    assert wait is None  # no schedstat opened
    # schedstat: "<on CPU ns> <waiting ns> <timeslices>", this thread's own
    profiler._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    try:
        began = time.monotonic()
        profiler._mark()
        t = time.thread_time()
        while time.thread_time() - t < 0.05:  # 50 ms of CPU, however long that takes
            pass
        cpu, wait, _ = profiler._mark()
        wall = time.monotonic() - began
    finally:
        os.close(profiler._schedstat)
    assert 0.05 <= cpu <= wall
    # on a CPU or waiting for one: together no more than the time that passed (a wait
    # read in the wrong unit would be 1000 times it)
    assert wait is not None and 0 <= wait <= wall - cpu + 0.005
