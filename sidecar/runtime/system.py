"""The machine and the container: CPU count, load, memory, cgroup v2 limits and usage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

CGROUP = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def cgroup_doc(root: Path = CGROUP) -> dict[str, Any] | None:
    """cgroup v2 limits and usage of this container, when present. A file that is
    missing or holds something unexpected leaves its fields out (never an error):
    `max` is no limit (None)."""
    if not (root / "cgroup.controllers").exists():
        return None
    doc: dict[str, Any] = {}
    cpu_max = _read(root / "cpu.max")
    if cpu_max:
        quota, _, period = cpu_max.partition(" ")
        per = _int(period or "100000")
        if quota == "max":
            doc["cpu_limit_cores"] = None
        elif (q := _int(quota)) is not None and per:
            doc["cpu_limit_cores"] = q / per
    stat = _read(root / "cpu.stat")
    if stat:
        fields = {k: _int(v) for k, _, v in (line.partition(" ") for line in stat.splitlines())}
        if (usage := fields.get("usage_usec")) is not None:
            doc["cpu_usage_seconds"] = usage / 1e6
        if (throttled := fields.get("nr_throttled")) is not None:
            doc["cpu_nr_throttled"] = throttled
            doc["cpu_throttled_seconds"] = (fields.get("throttled_usec") or 0) / 1e6
    mem_max = _read(root / "memory.max")
    if mem_max == "max":
        doc["memory_limit_bytes"] = None
    elif (limit := _int(mem_max)) is not None:
        doc["memory_limit_bytes"] = limit
    if (current := _int(_read(root / "memory.current"))) is not None:
        doc["memory_usage_bytes"] = current
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
