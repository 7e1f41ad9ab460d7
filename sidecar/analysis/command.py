"""`latency-sidecar analyze`: one run of load + profiles + stats, written to a run
directory, compared with the previous run, judged (exit 1 / 0; 2 on usage errors)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from ..config import ConfigError
from .capture import Capture, profiles, sample_loop
from .compare import NotARun, compare, load_run, previous_run
from .load import ENTRIES, RateLoad, Sample, locustfile, run_locust
from .recommend import findings, markdown
from .report import render
from .summary import summarise
from .target import Target, embedded_demo, from_env

DEFAULT_DURATION_S = 30.0
DEFAULT_RATE = 20.0
MISSING_MATPLOTLIB = (
    "latency-sidecar analyze: the report needs matplotlib: "
    "pip install 'latency-sidecar[analysis]' (or: pip install matplotlib)"
)


class UsageError(Exception):
    pass


def _positive(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw!r}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="load + CPU/block profiles + gateway stats + HTML report, compared with the "
        "previous run (exit 1 on a p95 over the gate or a regression)",
    )
    p.add_argument("--duration", type=_positive, metavar="S",
                   help=f"seconds of load (default {DEFAULT_DURATION_S:g})")  # fmt: skip
    p.add_argument("--rate", type=_positive, metavar="N",
                   help="requests per second from the built-in generator (default: the "
                   "locust profile when locust and loadtest/ are present, else "
                   f"{DEFAULT_RATE:g})")  # fmt: skip
    p.add_argument("--compare", metavar="DIR",
                   help="a previous run directory (default: the newest beside it)")  # fmt: skip
    p.add_argument("--p95-ms", type=_positive, default=120.0, metavar="MS",
                   help="gate: exit 1 when a p95 is over this (default 120)")  # fmt: skip
    p.add_argument("--out", metavar="DIR",
                   help="the run directory (default: ./analysis/<timestamp>)")  # fmt: skip
    # a slower embedded demo gateway, to try the regression gate; not for users
    p.add_argument("--demo-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_analyze)


def _run_dir(out: str | None) -> Path:
    if out:
        path = Path(out)
        if (path / "summary.json").exists():
            raise UsageError(f"--out {out}: already holds a run; choose a new directory")
        return path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path.cwd() / "analysis" / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path.cwd() / "analysis" / f"{stamp}-{n}"
    return path


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..eventloop import run_async

    if importlib.util.find_spec("matplotlib") is None:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    try:
        target = from_env(os.environ)
        run_dir = _run_dir(args.out)
        before: Path | None = None
        if args.compare:
            before = Path(args.compare)
            load_run(before)  # fails early, as a usage error
        else:
            before = previous_run(run_dir.parent, run_dir)
    except (UsageError, NotARun, ConfigError) as exc:
        print(f"latency-sidecar analyze: {exc}", file=sys.stderr)
        return 2
    try:
        return run_async(analyze(args, target, run_dir, before))
    except CannotRun as exc:
        print(f"latency-sidecar analyze: {exc}", file=sys.stderr)
        return 2


class CannotRun(Exception):
    pass


async def _reachable(tgt: Target) -> None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
            client.get(tgt.admin_url + "/healthz") as r,
        ):
            if r.status != 200:
                raise CannotRun(f"{tgt.admin_url}/healthz answered {r.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CannotRun(
            f"cannot reach the sidecar's admin listener {tgt.admin_url}: {exc}"
        ) from None


@contextlib.asynccontextmanager
async def _target(target: Target | None, delay_ms: float) -> AsyncIterator[Target]:
    if target is not None:
        yield target
        return
    async with embedded_demo(delay_ms) as demo:
        yield demo


async def _capture(
    args: argparse.Namespace, tgt: Target, run_dir: Path, duration: float
) -> tuple[list[Sample], Capture, str]:
    cap = Capture(interval=max(0.5, min(5.0, duration / 30)))
    lf = None if args.rate else locustfile()
    rate = args.rate or DEFAULT_RATE
    if lf is None and not args.rate:
        cap.notes.append(
            "locust or loadtest/locustfile.py not found: built-in generator at "
            f"{rate:g} req/s instead (pip install 'latency-sidecar[analysis]' in a checkout)"
        )
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        sampler = asyncio.create_task(sample_loop(client, tgt, cap, stop))
        prof = asyncio.create_task(profiles(client, tgt, cap, duration))
        try:
            if lf is not None:
                load = f"locust {lf.name} (smoke stages of {duration / 4.5:.1f} s)"
                samples, _ = await run_locust(lf, tgt.proxy_url, duration, run_dir)
            else:
                load = f"built-in generator, {rate:g} req/s (70% chat, 20% embeddings, 10% stream)"
                gen = RateLoad(tgt.proxy_url, rate, duration)
                await gen.run()
                samples = gen.samples
                if gen.dropped:
                    cap.notes.append(f"{gen.dropped} requests not sent: 2000 already in flight")
            await prof
        finally:
            stop.set()
            await sampler
            prof.cancel()
            await asyncio.gather(prof, return_exceptions=True)
    return samples, cap, load


def _block_text(block: dict[str, Any]) -> str:
    lines = [
        f"{block['stalls']} stalls of the event loop longer than {block['threshold_ms']:g} ms "
        f"in {block['seconds']:g} s, {block['blocked_ms']:.1f} ms blocked, longest "
        f"{block['max_stall_ms']:.1f} ms",
        "",
    ]
    for st in block["stacks"]:
        lines.append(f"--- {st['blocked_ms']:.1f} ms, {st['stalls']} stalls")
        lines += [f"  {f}" for f in reversed(st["frames"])]
        lines.append("")
    return "\n".join(lines)


async def analyze(
    args: argparse.Namespace, target: Target | None, run_dir: Path, before: Path | None
) -> int:
    duration = args.duration or DEFAULT_DURATION_S
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before anything runs
    started = time.time()
    try:
        async with _target(target, args.demo_delay_ms) as tgt:
            await _reachable(tgt)
            print(f"analysing {tgt.proxy_url} for {duration:g} s -> {run_dir}", flush=True)
            samples, cap, load = await _capture(args, tgt, run_dir, duration)
    except RuntimeError as exc:  # the embedded demo or locust did not run
        raise CannotRun(str(exc)) from None
    summary = summarise(samples, cap.samples, cap.cpu_folded, cap.block, args.p95_ms)
    comparison = None
    if before is not None:
        try:
            comparison = compare(before, summary, samples)
        except NotARun as exc:
            cap.notes.append(f"no comparison: {exc}")
    reasons = list(summary["gate"]["over"])
    if comparison:
        reasons += [f"regressed: {r}" for r in comparison["regressed"]]
    verdict = 1 if reasons else 0
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    meta = {
        "started_at": iso,
        "wall_s": round(time.time() - started, 2),
        "duration_s": duration,
        "load": load,
        "target": "embedded demo" if tgt.embedded else tgt.proxy_url,
        "verdict": verdict,
        "reasons": reasons,
        "notes": cap.notes,
    }
    summary["meta"] = meta
    found = findings(summary, samples, comparison)
    (run_dir / "client.json").write_text(
        json.dumps({"entries": list(ENTRIES), "samples": [s.as_json() for s in samples]})
    )
    (run_dir / "captures.json").write_text(json.dumps(cap.samples))
    (run_dir / "cpu.folded").write_text(cap.cpu_folded)
    if cap.block is not None:
        (run_dir / "block.json").write_text(json.dumps(cap.block, indent=1))
        (run_dir / "block.txt").write_text(_block_text(cap.block))
    if comparison:
        (run_dir / "compare.json").write_text(json.dumps(comparison, indent=1))
    (run_dir / "RECOMMENDATIONS.md").write_text(markdown(found, summary))
    html = render(meta, summary, samples, cap.samples, comparison, found, cap.notes)
    (run_dir / "report.html").write_text(html)
    # last: its presence marks a complete run (the next run compares with it)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"report: {run_dir / 'report.html'}")
    for reason in reasons:
        print(f"FAIL: {reason}")
    if comparison and not comparison["regressed"]:
        print(f"compared with {before}: no regression beyond the noise band")
    print("verdict: " + ("FAIL (exit 1)" if verdict else "PASS"))
    return verdict
