"""The load test and the benchmarks run, briefly, so they cannot rot (issue 7).

Full runs are for humans: `make loadtest`, `make bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.tools]


def run(args, env=None, timeout=180):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**clean, **(env or {})},
    )  # fmt: skip


def test_loadtest_passes_its_gate_and_fails_it_on_a_breach(tmp_path):
    quick = ["--load-profile", "smoke", "--stage-seconds", "1", "--max-error-rate", "0.5"]
    ok = run(["loadtest/run.py", *quick, "--p95-ms", "5000"],
             env={"LOADTEST_RESULTS": str(tmp_path / "ok")})  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    summary = (tmp_path / "ok" / "summary.md").read_text()
    assert "Gate: PASSED" in summary
    for entry in ("| chat |", "| embeddings |", "| chat stream: first event |"):
        assert entry in summary
    assert "sidecar p95" in summary
    assert (tmp_path / "ok" / "report.html").stat().st_size > 10_000

    breach = run(["loadtest/run.py", *quick, "--p95-ms", "1"],
                 env={"LOADTEST_RESULTS": str(tmp_path / "breach")})  # fmt: skip
    assert breach.returncode != 0
    assert "Gate: FAILED" in (tmp_path / "breach" / "summary.md").read_text()


def test_overhead_benchmark_runs_and_writes_its_results(tmp_path):
    out = run(["bench/overhead.py", "--rounds", "1", "--duration", "1", "--rates", "200",
               "--sse-requests", "10", "--rss-requests", "2000", "--connections", "8",
               "--out", str(tmp_path / "latest")])  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert set(doc["results"]) == {"direct", "nginx", "bare", "sidecar"}
    for entry in doc["results"].values():
        assert entry["max_rps"] > 0 and entry["200rps"]["p50"] > 0 and entry["sse_ttfb_ms"] > 0
    assert doc["soak"]["requests"] >= 2000
    md = (tmp_path / "latest.md").read_text()
    assert "sidecar / bare max throughput" in md
    assert (tmp_path / "latest.png").stat().st_size > 5_000


def test_engine_benchmark_prints_its_costs():
    out = run(["bench/engine.py"])
    assert out.returncode == 0, out.stderr
    for what in ("percentile engine:", "prometheus metrics:", "query", "tick with 100"):
        assert what in out.stdout


def test_ticks_benchmark_counts_the_same_bytecodes_every_run():
    """Deterministic by design: two runs print the same count."""
    first, second = (run(["bench/ticks.py", "--rate", "50"]) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert "bytecodes per busy second" in first.stdout
    assert first.stdout == second.stdout
