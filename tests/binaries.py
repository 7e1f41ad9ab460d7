"""External servers that cannot bind port 0 and tell us the port (Prometheus,
Alertmanager): start on a port that was free a moment ago, and if another process took
it meanwhile (the server exits at once), try again on another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from .conftest import free_port


def start_with_retry(
    argv_for: Callable[[int], list[str]],
    ready: str | Callable[[int], bool],
    attempts: int = 5,
    timeout: float = 30,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv_for(port)`` on a port free a moment ago, again on another one if it
    exits (a clash); return once it is ready: ``http://127.0.0.1:port{ready}`` answers
    200, or ``ready(port)`` is true."""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            argv_for(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(port) if callable(ready) else _http_ok(f"http://127.0.0.1:{port}{ready}"):
                return proc, port
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"{argv_for(0)[0]} did not start in {attempts} attempts")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def serving(argv_for: Callable[[int], list[str]], ready_path: str) -> Iterator[str]:
    """`start_with_retry` an HTTP server; yields its URL, stops it on the way out."""
    proc, port = start_with_retry(argv_for, ready_path)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def prometheus(targets: list[str], *flags: str, job: str = "sidecar") -> AsyncIterator[str]:
    """A real Prometheus (Debian's package) scraping ``targets`` every second; yields its
    URL once it is ready. ``flags``: e.g. ``--enable-feature=native-histograms``."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus missing: scripts/install-test-tools.sh installs it"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        cfg.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
                }
            )
        )
        server = serving(
            lambda port: [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
                *flags,
            ],
            "/-/ready",
        )
        url = await asyncio.to_thread(server.__enter__)
        try:
            yield url
        finally:
            server.__exit__(None, None, None)
