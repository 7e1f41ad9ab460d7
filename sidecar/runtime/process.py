"""One process, as a JSON document: CPU, memory, threads, descriptors, I/O. Fields the
kernel refuses come back null, with the reason under `unavailable`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psutil


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
