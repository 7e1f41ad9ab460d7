"""`latency-sidecar demo` runs, shows all three kinds of traffic, exits 0 (issue 3)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_and_exits_cleanly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--duration",
            "4",
            "--refresh",
            "1",
            "--rps",
            "60",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.rsplit("last 60s window", 1)[1]
    rows = {tuple(line.split()[:2]) for line in last.splitlines() if line.startswith("/")}
    assert ("/v1/chat/completions", "unary") in rows
    assert ("/v1/embeddings", "unary") in rows
    assert ("/v1/chat/completions", "stream") in rows
    assert "admin" in out.stdout and "/percentiles" in out.stdout
    assert "demo finished" in out.stdout
    assert "Traceback" not in out.stderr
