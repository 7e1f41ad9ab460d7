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
