"""RECOMMENDATIONS.md: rules that state what the data shows, each with its evidence.

Every rule reads figures of this run (and of the comparison, when there is one); a
rule that does not fire says nothing, and when none fires the file says so plainly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..printable import printable
from .compare import quantile_deltas
from .load import Sample

OVERHEAD_SHARE = 0.10  # sidecar's own time above this share of route latency
CPU_FULL = 90.0  # % of one core (sidecar) or of all cores (gateway)
LOOP_LAG_MS = 50.0
BLOCKED_MS = 50.0  # a stack that held the loop this long in total is a problem
NOTED_MS = 20.0  # shorter: noted (one short stall may be the OS preempting a syscall)
ERROR_RATE = 0.02
RSS_GROWTH = 0.20
RSS_GROWTH_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Finding:
    problem: bool  # False: an observation worth knowing, not a fault
    title: str
    evidence: str


def _where(frames: Sequence[str]) -> str:
    """The innermost frame that is not the standard library or a dependency."""
    for f in reversed(frames):
        if "/python3" not in f and "site-packages" not in f and not f.startswith("<"):
            return f
    return frames[-1] if frames else "?"


def _thirds(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    if not samples:
        return [], []
    t0 = min(s.t for s in samples)
    t1 = max(s.t for s in samples)
    span = (t1 - t0) / 3
    return (
        [s for s in samples if s.t < t0 + span],
        [s for s in samples if s.t >= t1 - span],
    )


def findings(
    summary: dict[str, Any], samples: Sequence[Sample], comparison: dict[str, Any] | None
) -> list[Finding]:
    out: list[Finding] = []
    entries = summary["entries"]
    overhead = summary.get("overhead") or {}
    gw = summary.get("gateway") or {}
    sc = summary.get("sidecar_process") or {}

    for reason in summary["gate"]["over"]:
        out.append(Finding(True, f"p95 over the {summary['p95_ms']:g} ms gate", reason))

    for route, o in overhead.items():
        if o["share"] is not None and o["share"] >= OVERHEAD_SHARE:
            out.append(
                Finding(
                    True,
                    f"sidecar overhead is {o['share']:.0%} of {route} latency: the sidecar is "
                    "CPU-starved — give it a full core",
                    f"mean overhead {o['overhead_mean_ms']:.2f} ms of a mean latency of "
                    f"{o['latency_mean_ms']:.1f} ms over {o['requests']} requests "
                    f"(sidecar_overhead_seconds / sidecar_request_duration_seconds); sidecar "
                    f"CPU peak {sc.get('cpu_percent_max', 0):.0f}% of a core",
                )
            )
    if sc.get("cpu_percent_max", 0) >= CPU_FULL:
        out.append(
            Finding(
                True,
                "the sidecar used a full core at peak: it is at its throughput limit",
                f"sidecar CPU peak {sc['cpu_percent_max']:.0f}%, mean "
                f"{sc.get('cpu_percent_mean') or 0:.0f}% of one core "
                f"({sc.get('cpu_ms_per_request') or 0:.3f} ms CPU per request); one Python "
                "process uses one core: scale out replicas",
            )
        )
    saturated = summary.get("saturated_captures") or 0
    if saturated:
        out.append(
            Finding(
                True,
                "the sidecar was saturated: its own percentiles understate what clients saw",
                f'/percentiles said "saturated": true in {saturated} of '
                f"{summary.get('captures', '?')} captures (event-loop lag > 100 ms); "
                "requests waited unread before the sidecar could time them",
            )
        )
    block = summary.get("block") or {}
    stacks = block.get("stacks", [])
    idle_total = sum(st["blocked_ms"] for st in stacks if st["idle"])
    gc_total = sum(st["blocked_ms"] for st in stacks if st.get("gc"))
    code_total = sum(st["blocked_ms"] for st in stacks if not st["idle"]) - gc_total
    if sc.get("loop_lag_max_ms", 0) >= LOOP_LAG_MS:
        starved = idle_total > code_total
        out.append(
            Finding(
                True,
                f"the sidecar's event loop lagged up to {sc['loop_lag_max_ms']:.0f} ms"
                + (
                    ", mostly while no code ran: the process did not get the CPU — give "
                    "it a full core, check CPU throttling and the node's load"
                    if starved
                    else ""
                ),
                "event_loop_lag_max_1m_ms in /stats; requests waited that long before the "
                f"sidecar could read or forward them; block profile: {code_total:.0f} ms held "
                f"by code, {gc_total:.0f} ms by the garbage collector, {idle_total:.0f} ms "
                "stalled with no code running",
            )
        )

    idle_ms = 0.0
    for st in block.get("stacks", []):
        if st["idle"]:
            idle_ms += st["blocked_ms"]
            continue
        if st.get("gc"):
            if st["blocked_ms"] >= NOTED_MS:
                out.append(
                    Finding(
                        st["blocked_ms"] >= BLOCKED_MS,
                        f"the garbage collector held the loop {st['blocked_ms']:.0f} ms",
                        f"{st['stalls']} collections over {block.get('threshold_ms', 20):g} "
                        f"ms, longest {st['max_stall_ms']:.0f} ms: fewer objects kept alive "
                        "(large caches, buffered bodies) make full collections shorter",
                    )
                )
            continue
        if st["blocked_ms"] >= NOTED_MS:
            out.append(
                Finding(
                    st["blocked_ms"] >= BLOCKED_MS,
                    f"loop blocked {st['blocked_ms']:.0f} ms in {_where(st['frames'])}",
                    f"{st['stalls']} stalls over {block.get('threshold_ms', 20):g} ms, longest "
                    f"{st['max_stall_ms']:.0f} ms; stack (innermost last): "
                    + " > ".join(st["frames"][-6:]),
                )
            )
    if idle_ms >= NOTED_MS:
        out.append(
            Finding(
                False,
                f"the loop stood still {idle_ms:.0f} ms with no code running: the process did "
                "not get the CPU",
                "block profile stalls whose samples show the loop idle (CPU throttling, a "
                "busy node, or another thread holding the GIL)",
            )
        )

    cores = gw.get("cpu_count") or 1
    if gw.get("cpu_percent_max", 0) >= CPU_FULL * cores or gw.get("cpu_percent_max", 0) >= 95:
        first, last = _thirds(samples)
        grew = [
            f"{entry}: p95 {d['p95']['before_ms']:.0f} -> {d['p95']['after_ms']:.0f} ms"
            for entry, d in quantile_deltas(first, last).items()
            if d["p95"]["verdict"] == "regressed"
        ]
        evidence = f"gateway CPU peak {gw['cpu_percent_max']:.0f}% ({cores} cores)"
        if grew:
            out.append(
                Finding(
                    True,
                    "gateway CPU at its limit while latency grows: scale the gateway",
                    evidence + "; first vs last third of the run: " + "; ".join(grew),
                )
            )
        else:
            out.append(
                Finding(
                    False,
                    "the gateway's CPU reached its limit",
                    evidence + "; latency did not grow beyond noise within the run",
                )
            )
    start, end = gw.get("rss_start_bytes") or 0, gw.get("rss_end_bytes") or 0
    if start and end - start > max(RSS_GROWTH * start, RSS_GROWTH_BYTES):
        out.append(
            Finding(
                True,
                "the gateway's memory grew during the run",
                f"RSS {start / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB",
            )
        )
    if summary["error_rate"] > ERROR_RATE:
        out.append(
            Finding(
                True,
                f"{summary['error_rate']:.1%} of requests failed",
                f"{summary['errors']} of {summary['requests']} requests got an HTTP error or "
                "no answer (client side)",
            )
        )
    for entry, doc in entries.items():
        side = doc.get("sidecar") or {}
        client_p50 = doc["p50"]["value_ms"]
        if side.get("p50_ms") and doc["n"] >= 100:
            gap = client_p50 - side["p50_ms"]
            if gap > max(10.0, 0.2 * side["p50_ms"]):
                out.append(
                    Finding(
                        True,
                        f"{entry}: the client waits {gap:.0f} ms more than the sidecar sees",
                        f"client p50 {client_p50:.1f} ms vs sidecar p50 {side['p50_ms']:.1f} ms: "
                        "time outside the sidecar (listen queue, network, load generator)",
                    )
                )
    if comparison:
        for reason in comparison["regressed"]:
            grew = [
                f"{r['function']} ({r['kind']} {r['before']:.1%} -> {r['after']:.1%})"
                for r in comparison["profile"]
                if r["change"] == "grew"
            ][:3]
            out.append(
                Finding(
                    True,
                    "regressed since the previous run",
                    reason
                    + (
                        "; CPU profile functions that grew: " + ", ".join(grew)
                        if grew
                        else "; no sidecar function's CPU share grew: the time is upstream"
                    ),
                )
            )
    for reason in summary["gate"]["undecided"]:
        out.append(Finding(False, "no verdict on a p95: too few samples", reason))
    prof = summary.get("profile") or {}
    if prof.get("functions"):
        top = prof["functions"][0]
        out.append(
            Finding(
                False,
                "where the sidecar's CPU went",
                f"the loop ran code in {prof.get('busy_share') or 0:.0%} of "
                f"{prof.get('all_samples')} samples; top function by own samples: "
                f"{top['function']} ({top['self']:.1%} self, {top['cum']:.1%} cumulative of "
                f"the {prof['samples']} busy samples)",
            )
        )
    return out


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#|"})


def _md(text: str) -> str:
    """A finding's text as Markdown shows it, whatever it quotes: route labels come from
    clients and function names from the target, so no newline, escape sequence, HTML
    tag or Markdown markup of theirs gets through."""
    return printable(text).translate(_MD_SPECIAL)


def markdown(found: Sequence[Finding], summary: dict[str, Any]) -> str:
    problems = [f for f in found if f.problem]
    notes = [f for f in found if not f.problem]
    lines = ["# Recommendations", ""]
    if not problems:
        sc = summary.get("sidecar_process") or {}
        lines += [
            "**Nothing is wrong.** No rule found a problem in this run: every judged p95 "
            f"is within {summary['p95_ms']:g} ms, the sidecar's overhead is under "
            f"{OVERHEAD_SHARE:.0%} of route latency, its loop never lagged "
            f"{LOOP_LAG_MS:g} ms (max {sc.get('loop_lag_max_ms', 0):.1f} ms), no code "
            f"held it for {BLOCKED_MS:g} ms, the gateway's CPU and memory stayed below "
            f"their limits, and {summary['error_rate']:.1%} of requests failed.",
            "",
        ]
    else:
        lines += ["## Problems", ""]
        for f in problems:
            lines += [f"- **{_md(f.title)}**", f"  - evidence: {_md(f.evidence)}"]
        lines.append("")
    if notes:
        lines += ["## Observations", ""]
        for f in notes:
            lines += [f"- {_md(f.title)}", f"  - evidence: {_md(f.evidence)}"]
        lines.append("")
    return "\n".join(lines)
