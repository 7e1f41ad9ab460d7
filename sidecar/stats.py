"""Runtime stats of the sidecar, of the gateway process, and of the system/container.

psutil calls are cheap but not free: they run at most once per `/stats` call or
scrape (in a worker thread), never per proxied request. The event-loop lag monitor is
a periodic timer on the loop itself.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CGROUP = Path("/sys/fs/cgroup")


class LoopLag:
    """Wakes every `interval` s and measures how late it woke: the event-loop lag.
    Keeps the current lag and the per-second maxima of the last minute."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.current = 0.0
        self._maxima: deque[tuple[int, float]] = deque(maxlen=60)

    @property
    def max_1m(self) -> float:
        cutoff = int(time.monotonic()) - 60
        return max((v for sec, v in self._maxima if sec > cutoff), default=self.current)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            self.current = lag
            sec = int(time.monotonic())
            if self._maxima and self._maxima[-1][0] == sec:
                if lag > self._maxima[-1][1]:
                    self._maxima[-1] = (sec, lag)
            else:
                self._maxima.append((sec, lag))


def _guarded(proc: psutil.Process, reasons: dict[str, str]) -> Callable[..., Any]:
    """Call a psutil accessor; on refusal return None and note why, never raise."""

    def call(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except psutil.AccessDenied:
            reasons[name] = "access denied (another UID without ptrace rights?)"
        except psutil.ZombieProcess:
            reasons[name] = "zombie process"
        except (NotImplementedError, AttributeError, OSError) as exc:
            reasons[name] = f"unavailable: {exc}"
        return None

    return call


def process_doc(proc: psutil.Process, *, cpu_percent: float | None = None) -> dict[str, Any]:
    """Everything we can read about one process; refused fields are null + reason."""
    reasons: dict[str, str] = {}
    g = _guarded(proc, reasons)
    with proc.oneshot():
        cpu = g("cpu_times", proc.cpu_times)
        mem = g("memory_info", proc.memory_info)
        io = g("io_counters", proc.io_counters)
        ctx = g("num_ctx_switches", proc.num_ctx_switches)
        conns = g("connections", lambda: len(proc.net_connections(kind="inet")))
        doc: dict[str, Any] = {
            "pid": proc.pid,
            "name": g("name", proc.name),
            "status": g("status", proc.status),
            "create_time": g("create_time", proc.create_time),
            "cpu_percent": cpu_percent,
            "cpu_seconds": None if cpu is None else round(cpu.user + cpu.system, 3),
            "cpu_user_seconds": None if cpu is None else cpu.user,
            "cpu_system_seconds": None if cpu is None else cpu.system,
            "rss_bytes": None if mem is None else mem.rss,
            "vms_bytes": None if mem is None else mem.vms,
            "threads": g("num_threads", proc.num_threads),
            "open_fds": g("num_fds", proc.num_fds),
            "connections": conns,
            "ctx_switches": None if ctx is None else ctx._asdict(),
            "io": None if io is None else io._asdict(),
        }
    if reasons:
        doc["unavailable"] = reasons
    return doc


class Target:
    """The gateway process, by PID or by name; re-resolved when it goes away (a
    restarted gateway has a new PID)."""

    def __init__(self, pid: int | None, name: str) -> None:
        self.pid_hint = pid
        self.name = name
        self._proc: psutil.Process | None = None

    @property
    def configured(self) -> bool:
        return bool(self.pid_hint or self.name)

    def _resolve(self) -> psutil.Process:
        if self._proc is not None and self._proc.is_running():
            return self._proc
        self._proc = None
        if self.pid_hint:
            self._proc = psutil.Process(self.pid_hint)  # NoSuchProcess propagates
            return self._proc
        me = os.getpid()
        found = []
        for p in psutil.process_iter(["name", "cmdline", "create_time"]):
            if p.pid == me:
                continue
            cmdline = p.info.get("cmdline") or []
            exe = os.path.basename(cmdline[0]) if cmdline else ""
            if self.name in (p.info.get("name"), exe):
                found.append(p)
        if not found:
            raise psutil.NoSuchProcess(pid=-1, msg=f"no process named {self.name!r}")
        # the oldest match is the main process; workers it forked are its children
        self._proc = min(found, key=lambda p: p.info.get("create_time") or 0.0)
        return self._proc

    def sample(self) -> dict[str, Any] | None:
        if not self.configured:
            return None
        try:
            proc = self._resolve()
            cpu_pct = proc.cpu_percent(None)
            return process_doc(proc, cpu_percent=cpu_pct)
        except psutil.NoSuchProcess as exc:
            self._proc = None
            what = f"pid {self.pid_hint}" if self.pid_hint else f"name {self.name!r}"
            return {"pid": None, "error": f"target process not found ({what}): {exc.msg}"}
        except psutil.AccessDenied:
            return {"pid": None, "error": "access denied while looking up the target"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_doc(root: Path = CGROUP) -> dict[str, Any] | None:
    """cgroup v2 limits and usage of this container, when present."""
    if not (root / "cgroup.controllers").exists():
        return None
    doc: dict[str, Any] = {}
    cpu_max = _read(root / "cpu.max")
    if cpu_max:
        quota, _, period = cpu_max.partition(" ")
        doc["cpu_limit_cores"] = None if quota == "max" else int(quota) / int(period or 100000)
    stat = _read(root / "cpu.stat")
    if stat:
        fields = dict(line.split(" ", 1) for line in stat.splitlines() if " " in line)
        if "usage_usec" in fields:
            doc["cpu_usage_seconds"] = int(fields["usage_usec"]) / 1e6
        if "nr_throttled" in fields:
            doc["cpu_nr_throttled"] = int(fields["nr_throttled"])
            doc["cpu_throttled_seconds"] = int(fields.get("throttled_usec", 0)) / 1e6
    mem_max = _read(root / "memory.max")
    if mem_max:
        doc["memory_limit_bytes"] = None if mem_max == "max" else int(mem_max)
    mem_cur = _read(root / "memory.current")
    if mem_cur:
        doc["memory_usage_bytes"] = int(mem_cur)
    return doc


def system_doc() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "cpu_count": psutil.cpu_count(),
        "load_average": list(os.getloadavg()),
        "memory": {
            "total_bytes": vm.total,
            "available_bytes": vm.available,
            "used_percent": vm.percent,
        },
        "cgroup": cgroup_doc(),
    }


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


class RuntimeCollector(Collector):
    """`sidecar_target_*` and `sidecar_event_loop_lag_seconds` at scrape time (the
    scrape already runs on a worker thread)."""

    def __init__(self, stats: RuntimeStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "sidecar_event_loop_lag_seconds",
            "How late the sidecar's event loop runs a timer (current, and max over 1 min).",
            labels=["window"],
        )
        lag.add_metric(["current"], self._stats.lag.current)
        lag.add_metric(["1m_max"], self._stats.lag.max_1m)
        yield lag
        sampled = self._stats.sample().get("target")
        if sampled is None:  # no target configured: no sidecar_target_* series at all
            return
        target = sampled
        up = GaugeMetricFamily(
            "sidecar_target_up", "1 when the gateway process was found and read."
        )
        up.add_metric([], 1.0 if target.get("pid") else 0.0)
        yield up
        gauges = (
            ("sidecar_target_rss_bytes", "rss_bytes", "Gateway resident set size."),
            ("sidecar_target_threads", "threads", "Gateway OS threads."),
            ("sidecar_target_open_fds", "open_fds", "Gateway open file descriptors."),
            ("sidecar_target_connections", "connections", "Gateway inet connections."),
        )
        for name, key, doc in gauges:
            if target.get(key) is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(target[key]))
                yield g
        if target.get("cpu_seconds") is not None:
            c = CounterMetricFamily(
                "sidecar_target_cpu_seconds", "Gateway CPU time (user + system)."
            )
            c.add_metric([], float(target["cpu_seconds"]))
            yield c
