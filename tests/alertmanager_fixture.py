"""A real Alertmanager (Debian prometheus-alertmanager) on a free port."""

from __future__ import annotations

import shutil
import tempfile
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
    from .binaries import serving

    exe = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert exe, "prometheus-alertmanager missing: make test installs it"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "am.yml"
        cfg.write_text(CONFIG)
        argv = [exe, f"--config.file={cfg}", f"--storage.path={tmp}", "--cluster.listen-address="]

        def argv_for(port: int) -> list[str]:
            return [*argv, f"--web.listen-address=127.0.0.1:{port}"]

        with serving(argv_for, "/-/ready") as url:
            yield url
