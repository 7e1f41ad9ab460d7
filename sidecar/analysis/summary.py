"""From raw captures to figures: per-entry percentiles with confidence bounds and the
gate, time series for the plots, overhead, gateway and sidecar CPU per request, the
CPU profile's functions."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from .load import ENTRIES, SIDECAR_VIEW, Sample
from .quantiles import estimate, explain, verdict

QUANTILES = (0.5, 0.95, 0.99)
GATE_CONFIDENCE = 0.99  # "over" needs strong evidence: <= 1% false fails at the limit


def by_entry(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        out[s.entry].append(s)
    return out


def _proc(sample: dict[str, Any], who: str) -> dict[str, Any]:
    doc = sample["stats"].get(who) or {}
    return doc if doc.get("pid") else {}


def _rate(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return float(b[key]) - float(a[key])


def sidecar_view(pct: dict[str, Any], entry: str) -> dict[str, Any]:
    section, route = SIDECAR_VIEW.get(entry, ("routes", entry))
    window = str(pct.get("windows_s", [60])[0])
    doc: dict[str, Any] = pct.get(section, {}).get(route, {}).get(window, {})
    return doc


def anatomy_view(pct: dict[str, Any], entry: str) -> dict[str, Any]:
    """A stream entry's time to first token and per output token, from the sidecar's
    `ttft` and `tpot` sections (p50/p95/p99 of its shortest window); {} otherwise."""
    section, route = SIDECAR_VIEW.get(entry, ("routes", entry))
    if section != "streams":
        return {}
    window = str(pct.get("windows_s", [60])[0])
    return {
        name: pct.get(name, {}).get(route, {}).get(window, {})
        for name in ("ttft", "tpot")
        if pct.get(name, {}).get(route)
    }


IDLE_LEAVES = ("run (", "run_forever (", "run_until_complete (", "_run_once (")


def idle(leaf: str) -> bool:
    """A sample of the loop waiting for I/O: with uvloop no Python frame above the
    runner, with asyncio's loop inside the selector."""
    if "selectors.py" in leaf:
        return True
    return leaf.startswith(IDLE_LEAVES) and ("asyncio/" in leaf or "uvloop" in leaf)


def functions(folded: str) -> tuple[int, int, dict[str, float], dict[str, float]]:
    """(all samples, busy samples, self share, cumulative share) per function of folded
    stacks; shares are of the busy samples (the loop running code, not waiting)."""
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = busy = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        if idle(frames[-1]):
            continue
        busy += n
        own[frames[-1]] += n
        for f in set(frames):
            cum[f] += n
    if not busy:
        return total, 0, {}, {}
    return (
        total,
        busy,
        {f: n / busy for f, n in own.items()},
        {f: n / busy for f, n in cum.items()},
    )


def summarise(
    samples: Sequence[Sample],
    captures: Sequence[dict[str, Any]],
    folded: str,
    block: dict[str, Any] | None,
    p95_ms: float,
) -> dict[str, Any]:
    groups = by_entry(samples)
    entries: dict[str, Any] = {}
    over: list[str] = []
    undecided: list[str] = []
    last = captures[-1] if captures else None
    first = captures[0] if captures else None
    for entry in [*ENTRIES, *sorted(set(groups) - set(ENTRIES))]:
        rows = groups.get(entry, [])
        if not rows:
            continue
        ordered = sorted(s.ms for s in rows)
        ests = {q: estimate(ordered, q, GATE_CONFIDENCE) for q in QUANTILES}
        judged = verdict(ests[0.95], p95_ms)
        if judged == "over":
            over.append(explain(ests[0.95], p95_ms, entry))
        elif judged == "inconclusive":
            undecided.append(explain(ests[0.95], p95_ms, entry))
        doc: dict[str, Any] = {
            "n": len(rows),
            "errors": sum(1 for s in rows if not s.ok),
            **{f"p{q * 100:g}": ests[q].as_json() for q in QUANTILES},
            "gate": judged,
            "sidecar": sidecar_view(last["percentiles"], entry) if last else {},
            "anatomy": anatomy_view(last["percentiles"], entry) if last else {},
        }
        entries[entry] = doc
    requests = len(samples)
    errors = sum(1 for s in samples if not s.ok)
    out: dict[str, Any] = {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "p95_ms": p95_ms,
        "entries": entries,
        "gate": {"verdict": "fail" if over else "pass", "over": over, "undecided": undecided},
        "overhead": overhead(first, last) if first and last and first is not last else {},
        "gateway": process_use(captures, "target", requests),
        "sidecar_process": process_use(captures, "sidecar", requests),
        "block": block,
        # captures in which the sidecar said its loop lagged > 100 ms: its own timings
        # then miss the time requests waited unread (README "Saturation")
        "saturated_captures": sum(1 for c in captures if c["percentiles"].get("saturated")),
        "captures": len(captures),
    }
    total, n, own, cum = functions(folded)
    top = sorted(cum, key=lambda f: (-own.get(f, 0.0), -cum[f]))
    out["profile"] = {
        "samples": n,
        "all_samples": total,
        "busy_share": round(n / total, 4) if total else None,
        "functions": [
            {"function": f, "self": round(own.get(f, 0.0), 5), "cum": round(cum[f], 5)}
            for f in top
            if cum[f] >= 0.001
        ],
    }
    return out


def overhead(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Mean overhead vs mean latency per route over the run (histogram sums/counts)."""
    out: dict[str, Any] = {}
    a, b = first["sums"], last["sums"]
    for route, (s1, c1) in b["overhead"].items():
        s0, c0 = a["overhead"].get(route, [0.0, 0.0])
        d0, n0 = a["duration"].get(route, [0.0, 0.0])
        d1, n1 = b["duration"].get(route, [0.0, 0.0])
        count, latency_n = c1 - c0, n1 - n0
        if count <= 0:
            continue
        mean_ms = (s1 - s0) / count * 1000
        latency_ms = (d1 - d0) / latency_n * 1000 if latency_n > 0 else None
        out[route] = {
            "requests": int(count),
            "overhead_mean_ms": round(mean_ms, 4),
            "latency_mean_ms": None if latency_ms is None else round(latency_ms, 3),
            "share": None if not latency_ms else round(mean_ms / latency_ms, 5),
        }
    return out


def process_use(captures: Sequence[dict[str, Any]], who: str, requests: int) -> dict[str, Any]:
    procs = [(c["t"], _proc(c, who)) for c in captures]
    procs = [(t, p) for t, p in procs if p]
    if len(procs) < 2:
        return {}
    (t0, a), (t1, b) = procs[0], procs[-1]
    cpu = _rate(a, b, "cpu_seconds")
    series = cpu_series(captures, who)
    rss = [p.get("rss_bytes") or 0 for _, p in procs]
    doc: dict[str, Any] = {
        "pid": b.get("pid"),
        "cpu_seconds": None if cpu is None else round(cpu, 4),
        "cpu_percent_mean": None if cpu is None else round(cpu / (t1 - t0) * 100, 2),
        "cpu_percent_max": round(max((v for _, v in series), default=0.0), 2),
        "cpu_ms_per_request": None if cpu is None or not requests else cpu / requests * 1000,
        "rss_start_bytes": rss[0],
        "rss_end_bytes": rss[-1],
        "rss_max_bytes": max(rss),
        "threads_max": max((p.get("threads") or 0) for _, p in procs),
    }
    if who == "sidecar":
        lags = [p.get("event_loop_lag_max_1m_ms") or 0.0 for _, p in procs]
        doc["loop_lag_max_ms"] = max(lags)
    cores = (captures[-1]["stats"].get("system") or {}).get("cpu_count")
    doc["cpu_count"] = cores
    return doc


def cpu_series(captures: Sequence[dict[str, Any]], who: str) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    prev: tuple[float, dict[str, Any]] | None = None
    for c in captures:
        p = _proc(c, who)
        if not p:
            continue
        if prev is not None and p.get("pid") == prev[1].get("pid"):
            d = _rate(prev[1], p, "cpu_seconds")
            dt = c["t"] - prev[0]
            if d is not None and dt > 0:
                out.append((c["t"], d / dt * 100))
        prev = (c["t"], p)
    return out


def rolling_client(rows: Sequence[Sample], at: Sequence[float], window_s: float, q: float) -> list[
    float | None
]:  # fmt: skip
    """The client's q-quantile over the same trailing window as the sidecar's, at each
    capture time (a request counts when it finished, as in the sidecar)."""
    done = sorted((s.t + s.ms / 1000, s.ms) for s in rows)
    out: list[float | None] = []
    for t in at:
        vals = sorted(ms for end, ms in done if t - window_s < end <= t)
        out.append(estimate(vals, q).value if vals else None)
    return out


def overhead_series(captures: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Mean overhead per capture interval and route, ms."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for a, b in itertools.pairwise(captures):
        for route, (s1, c1) in b["sums"]["overhead"].items():
            s0, c0 = a["sums"]["overhead"].get(route, [0.0, 0.0])
            if c1 - c0 > 0:
                out[route].append((b["t"], (s1 - s0) / (c1 - c0) * 1000))
    return out
