"""Finding the gateway process (by PID or name) in a shared PID namespace."""

from __future__ import annotations

import os
from typing import Any

import psutil

from .process import process_doc


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
