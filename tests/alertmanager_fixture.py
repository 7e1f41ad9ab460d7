"""A real Alertmanager (Debian prometheus-alertmanager) on a free port."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CONFIG = """
route:
  receiver: "null"
  group_wait: 1s
receivers:
  - name: "null"
"""


@pytest.fixture
def alertmanager() -> Iterator[str]:
    from .conftest import free_port

    exe = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert exe, "prometheus-alertmanager missing: .ci/run installs it"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "am.yml"
        cfg.write_text(CONFIG)
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.path={tmp}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("alertmanager did not start") from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)
