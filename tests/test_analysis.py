"""`latency-sidecar analyze` (issue 16): the honest gate, the run directory, the HTML
report in a real headless Chromium, and --compare catching an injected upstream delay."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.analysis.load import Sample
from sidecar.analysis.quantiles import estimate, rank_bounds, verdict
from sidecar.analysis.recommend import findings, markdown
from sidecar.analysis.report import CHECK_IMAGES

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--window-size=1200,3000",
]  # fmt: skip


def test_order_statistic_bounds():
    # 21 samples: the p95 is the 20th value; a 95% lower bound exists (the 18th), an
    # upper bound does not (even the maximum is not enough): no "within" verdict
    assert rank_bounds(21, 0.95, 0.95) == (18, None)
    assert rank_bounds(100, 0.95, 0.95) == (91, 99)
    assert rank_bounds(58, 0.95, 0.95)[1] is None and rank_bounds(59, 0.95, 0.95)[1] == 59
    # the normal approximation for huge n agrees with the exact binomial near its switch
    lo, hi = rank_bounds(200_000, 0.95, 0.99)
    lo2, hi2 = rank_bounds(200_001, 0.95, 0.99)
    assert lo is not None and lo2 is not None and abs(lo - lo2) <= 2
    assert hi is not None and hi2 is not None and abs(hi - hi2) <= 2


def test_bounds_cover_the_true_quantile_as_promised():
    rng = random.Random(7)
    covered = 0
    trials = 300
    for _ in range(trials):  # uniform(0, 1): the true p95 is 0.95
        est = estimate(sorted(rng.random() for _ in range(200)), 0.95, 0.95)
        assert est.low is not None and est.high is not None
        covered += est.low <= 0.95 <= est.high
    assert covered / trials >= 0.88  # two one-sided 95% bounds: >= 90% two-sided


def test_gate_verdicts():
    few = sorted([100.0] * 18 + [300.0] * 3)  # p95 = 300 on 21 samples
    assert verdict(estimate(few, 0.95), 250) == "inconclusive"
    assert verdict(estimate(few, 0.95), 50) == "over"  # even the lower bound is above
    many = sorted([100.0] * 990 + [300.0] * 10)
    assert verdict(estimate(many, 0.95), 250) == "within"


def _analyze(*args, cwd=ROOT, env=None, timeout=120):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "analyze", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env={**clean, **(env or {})},
    )  # fmt: skip


def test_usage_errors_exit_2(tmp_path):
    for args, env, says in (
        (["--duration", "0"], None, "--duration"),
        (["--rate", "x"], None, "--rate"),
        (["--compare", str(tmp_path / "nope")], None, "not an analysis run directory"),
        ([], {"SIDECAR_ANALYZE_URL": "http://127.0.0.1:1"}, "SIDECAR_ANALYZE_ADMIN_URL"),
        ([], {"SIDECAR_ANALYZE_URL": "ftp://x"}, "SIDECAR_ANALYZE_URL"),
        (
            ["--out", str(tmp_path / "unreachable")],
            {
                "SIDECAR_ANALYZE_URL": "http://127.0.0.1:1",
                "SIDECAR_ANALYZE_ADMIN_URL": "http://127.0.0.1:1",
            },
            "cannot reach the sidecar's admin listener",
        ),
    ):
        r = _analyze(*args, cwd=tmp_path, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    r = _analyze("--out", str(tmp_path / "done"), cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_missing_matplotlib_is_one_line():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from sidecar.cli import main; sys.exit(main(['analyze']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "pip install 'latency-sidecar[analysis]'" in r.stderr


def render(html: Path, out: Path, tmp: Path) -> tuple[bytes, list[str]]:
    """Screenshot `html` in headless Chromium; the PNG and every console message."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium missing: scripts/install-test-tools.sh installs it"
    r = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}", f"--screenshot={out}",
         html.as_uri()],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    return (out.read_bytes() if out.exists() else b""), console


@pytest.mark.tools
def test_the_console_check_sees_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<img src="data:image/png;base64,AAAA" alt="broken">' + CHECK_IMAGES)
    _, console = render(bad, tmp_path / "bad.png", tmp_path / "profile")
    assert any("did not decode: broken" in ln for ln in console), console


@pytest.mark.slow
@pytest.mark.tools
@pytest.mark.timeout(400)  # three analyses (~60 s on a quiet machine, twice that on a busy one)
def test_analyze_the_demo_then_compare_clean_and_with_a_slower_upstream(tmp_path):
    runs = tmp_path / "analysis"
    quick = ["--duration", "4", "--rate", "40", "--p95-ms", "5000"]
    first = _analyze(*quick, "--out", str(runs / "1"), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    run = runs / "1"
    for name in ("report.html", "summary.json", "client.json", "captures.json", "cpu.folded",
                 "block.json", "block.txt", "RECOMMENDATIONS.md"):  # fmt: skip
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["requests"] >= 100
    entries = summary["entries"]
    assert set(entries) == {"/v1/chat/completions", "/v1/embeddings",
                            "/v1/chat/completions (stream)"}  # fmt: skip
    chat = entries["/v1/chat/completions"]
    assert 30 < chat["p50"]["value_ms"] < 200 and chat["gate"] in ("within", "inconclusive")
    assert chat["sidecar"]["count"] > 0  # the sidecar's own view of the same route
    # streams: the anatomy's time to first token (after the demo's ping and role chunk)
    # and per output token; unary entries have none
    tokens = entries["/v1/chat/completions (stream)"]["anatomy"]
    assert tokens["ttft"]["p95_ms"] > 0 and tokens["tpot"]["p95_ms"] > 0, tokens
    assert chat["anatomy"] == {}
    assert summary["captures"] > 0 and "saturated_captures" in summary
    assert summary["gateway"]["cpu_seconds"] > 0 and summary["gateway"]["rss_end_bytes"] > 0
    assert summary["profile"]["all_samples"] > 100
    assert summary["block"]["threshold_ms"] == 20
    assert summary["overhead"]["/v1/chat/completions"]["share"] < 0.5
    assert "# Recommendations" in (run / "RECOMMENDATIONS.md").read_text()
    assert "matplotlib" not in first.stderr

    png, console = render(run / "report.html", tmp_path / "report.png", tmp_path / "chrome")
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert console == [], console
    html = (run / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') >= 5
    assert "http://" not in html.replace("http://127.0.0.1", "")  # nothing external

    # the same again: compared with the previous run by default, and clean
    second = _analyze(*quick, "--out", str(runs / "2"), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "no regression beyond the noise band" in second.stdout
    comparison = json.loads((runs / "2" / "compare.json").read_text())
    assert comparison["before"] == str(runs / "1") and comparison["regressed"] == []

    # a gateway 150 ms slower: a regression, exit 1; and with a p95 gate of 60 ms,
    # the p95 (~300 ms now) is confidently over it too: both reasons are given
    slower = _analyze("--duration", "4", "--rate", "40", "--p95-ms", "60",
                      "--out", str(runs / "3"), "--compare", str(runs / "2"),
                      "--demo-delay-ms", "150", cwd=tmp_path)  # fmt: skip
    assert slower.returncode == 1, slower.stdout + slower.stderr
    assert "FAIL: regressed: /v1/chat/completions: p50" in slower.stdout
    assert "FAIL: /v1/chat/completions: p95" in slower.stdout
    comparison = json.loads((runs / "3" / "compare.json").read_text())
    assert comparison["entries"]["/v1/chat/completions"]["p50"]["delta_ms"] > 100
    recommendations = (runs / "3" / "RECOMMENDATIONS.md").read_text()
    assert "regressed since the previous run" in recommendations
    assert "p95 over the 60 ms gate" in recommendations
    assert "Compared with the previous run" in (runs / "3" / "report.html").read_text()


def _calm_summary(**more: object) -> dict[str, object]:
    """A run's summary in which no rule should fire."""
    return {
        "entries": {}, "p95_ms": 120.0, "error_rate": 0.0, "requests": 1000,
        "gate": {"over": [], "undecided": []}, "overhead": {}, "gateway": {},
        "sidecar_process": {"loop_lag_max_ms": 3.0, "cpu_percent_max": 20.0},
        "block": {"stacks": []}, "captures": 10, "saturated_captures": 0, **more,
    }  # fmt: skip


def test_recommendations_say_plainly_when_nothing_is_wrong():
    summary = _calm_summary()
    found = findings(summary, [], None)
    assert [f for f in found if f.problem] == []
    assert "**Nothing is wrong.**" in markdown(found, summary)


def test_recommendations_name_a_saturated_sidecar():
    summary = _calm_summary(saturated_captures=4)
    found = findings(summary, [], None)
    (saturated,) = [f for f in found if "saturated" in f.title]
    assert saturated.problem and "4 of 10 captures" in saturated.evidence
    assert "Nothing is wrong" not in markdown(found, summary)


def test_recommendations_tell_the_collector_from_code():
    stack = {"stalls": 4, "samples": 4, "blocked_ms": 400.0, "max_stall_ms": 110.0}
    gc_held = {**stack, "idle": False, "gc": True,
               "frames": ["garbage collection held the loop"]}  # fmt: skip
    code = {**stack, "idle": False, "gc": False, "frames": ["handler (app.py:3)"]}
    found = findings(_calm_summary(block={"stacks": [gc_held, code]}), [], None)
    titles = [f.title for f in found if f.problem]
    assert titles == [
        "the garbage collector held the loop 400 ms",
        "loop blocked 400 ms in handler (app.py:3)",
    ]


def test_what_clients_and_targets_put_in_names_stays_text():
    """Route labels come from clients' paths, function names and figures from the
    target: in the plots, RECOMMENDATIONS.md and the report they stay text."""
    from sidecar.analysis.recommend import Finding
    from sidecar.analysis.report import CSP, _n, plots

    # mathtext in a legend ("$\\foo$" from a request path) made the whole report fail
    t0 = time.time()
    samples = [Sample(t0 + i * 0.01, "/$\\foo$", 10.0 + i % 7, True) for i in range(200)]
    assert plots({"gate": {}, "p95_ms": 120}, samples, [], None)["latency"].startswith("data:")
    # markdown: no raw HTML, heading, newline or escape sequence gets through
    hostile = Finding(True, "overhead of /<img src=x onerror=alert(1)>", "in f\n# forged\x1b[2J")
    text = markdown([hostile], {"p95_ms": 120, "error_rate": 0.0})
    assert not re.search(r"(?<!\\)<", text), text  # every "<" escaped: literal text
    assert "\n# forged" not in text and "\x1b" not in text
    assert "\\<img src=x onerror=alert(1)\\>" in text
    # the report's figures: a string where a number belongs is no number (and no tag)
    assert math.isnan(_n("<script>")) and math.isnan(_n(True)) and _n(10**400) == math.inf
    assert "script-src 'sha256-" in CSP and "default-src 'none'" in CSP


async def test_a_hostile_target_cannot_crash_or_flood_the_capture(monkeypatch):
    """/stats nested past any parser's recursion, a block profile that is no object and
    a /metrics answer bigger than the cap: each is a note, the capture goes on."""
    from aiohttp import web

    from sidecar.analysis import capture as cap_mod
    from sidecar.analysis.target import Target

    from .conftest import serve_app

    monkeypatch.setattr(cap_mod, "ANSWER_MAX", 1 << 20)

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text="[" * 100_000, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="# x\n" * (1 << 19))  # 2 MiB

    async def block(_: web.Request) -> web.Response:
        return web.json_response([1, 2, 3])

    async def cpu(_: web.Request) -> web.Response:
        return web.Response(text="main;f 1\n")

    app = web.Application()
    app.router.add_get("/stats", stats)

    async def percentiles(_: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_get("/percentiles", percentiles)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/pprof/block", block)
    app.router.add_get("/debug/pprof/cpu", cpu)
    async with serve_app(app) as url, aiohttp.ClientSession() as client:
        target = Target(url, url, url, "t" * 40, embedded=False)
        capture = cap_mod.Capture(interval=0.01)
        stop = asyncio.Event()
        stop.set()  # one sample, then return
        await cap_mod.sample_loop(client, target, capture, stop)
        await cap_mod.profiles(client, target, capture, 1)
    assert capture.samples == [] and "a sample failed" in capture.notes[0]
    assert capture.block is None and capture.cpu_folded == "main;f 1\n"
