"""External servers that cannot bind port 0 and tell us the port (Prometheus,
Alertmanager): start on a port that was free a moment ago, and if another process took
it meanwhile (the server exits at once), try again on another."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable

from .conftest import free_port


def start_with_retry(
    argv_for: Callable[[int], list[str]], ready_path: str, attempts: int = 5, timeout: float = 30
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv_for(port)``; return once ``http://127.0.0.1:port{ready_path}`` is 200."""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            argv_for(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1) as r:
                    if r.status == 200:
                        return proc, port
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"{argv_for(0)[0]} did not start in {attempts} attempts")
