"""Before/after: per-entry p50/p95/p99 deltas with a noise band, the CPU profile's
functions whose share grew or shrank, gateway CPU per request.

Noise band (method): each run's quantile gets a distribution-free 99% confidence
interval from its own client samples (order statistics, see quantiles.py). The band of
a delta is the sum of the two half-widths — a delta beyond it means the two intervals
do not overlap — and never less than 5 ms or 25% of the before value (what a shared
machine moves between identical runs). A quantile without an interval in either run
(too few samples for it: a p99 needs about 460) gets no verdict. Any quantile that
regressed beyond its band fails the run (a short run often can bound only its p50).

Profile shares are sampled too: a function's share moved when the change exceeds three
binomial standard errors of the two shares and one percentage point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .load import Sample
from .quantiles import estimate
from .summary import QUANTILES, by_entry

CONFIDENCE = 0.99
FLOOR_MS = 5.0
FLOOR_REL = 0.25


class NotARun(ValueError):
    pass


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[Sample]]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = json.loads((run_dir / "client.json").read_text())["samples"]
    except (OSError, ValueError, KeyError) as exc:
        raise NotARun(f"{run_dir} is not an analysis run directory ({exc})") from None
    return summary, [Sample(t, e, ms, ok) for t, e, ms, ok in rows]


def previous_run(parent: Path, exclude: Path) -> Path | None:
    """The newest other run directory under `parent` (by its summary's mtime)."""
    if not parent.is_dir():
        return None
    runs = [
        d
        for d in parent.iterdir()
        if d.is_dir() and d.resolve() != exclude.resolve() and (d / "summary.json").is_file()
    ]
    return max(runs, key=lambda d: (d / "summary.json").stat().st_mtime, default=None)


def quantile_deltas(before: list[Sample], after: list[Sample]) -> dict[str, Any]:
    a, b = by_entry(before), by_entry(after)
    out: dict[str, Any] = {}
    for entry in sorted(set(a) & set(b)):
        xs, ys = sorted(s.ms for s in a[entry]), sorted(s.ms for s in b[entry])
        per_q: dict[str, Any] = {}
        for q in QUANTILES:
            e0, e1 = estimate(xs, q, CONFIDENCE), estimate(ys, q, CONFIDENCE)
            delta = e1.value - e0.value
            h0, h1 = e0.half_width, e1.half_width
            doc: dict[str, Any] = {
                "before_ms": round(e0.value, 3),
                "after_ms": round(e1.value, 3),
                "delta_ms": round(delta, 3),
                "n_before": e0.n,
                "n_after": e1.n,
            }
            if h0 is None or h1 is None:
                doc.update(band_ms=None, verdict="too few samples")
            else:
                band = max(h0 + h1, FLOOR_MS, FLOOR_REL * e0.value)
                doc["band_ms"] = round(band, 3)
                doc["verdict"] = (
                    "regressed" if delta > band else "improved" if delta < -band else "same"
                )
            per_q[f"p{q * 100:g}"] = doc
        out[entry] = per_q
    return out


def profile_diff(before: dict[str, Any], after: dict[str, Any], top: int = 15) -> list[Any]:
    p0, p1 = before.get("profile") or {}, after.get("profile") or {}
    n0, n1 = p0.get("samples", 0), p1.get("samples", 0)
    if not n0 or not n1:
        return []
    s0 = {f["function"]: f for f in p0.get("functions", [])}
    s1 = {f["function"]: f for f in p1.get("functions", [])}
    rows = []
    for fn in set(s0) | set(s1):
        for kind in ("self", "cum"):
            a = s0.get(fn, {}).get(kind, 0.0)
            b = s1.get(fn, {}).get(kind, 0.0)
            se = math.sqrt(a * (1 - a) / n0 + b * (1 - b) / n1)
            if abs(b - a) > max(3 * se, 0.01):
                rows.append(
                    {
                        "function": fn,
                        "kind": kind,
                        "before": round(a, 4),
                        "after": round(b, 4),
                        "change": "grew" if b > a else "shrank",
                    }
                )
    rows.sort(key=lambda r: -abs(r["after"] - r["before"]))
    return rows[:top]


def compare(
    before_dir: Path, after_summary: dict[str, Any], after_samples: list[Sample]
) -> dict[str, Any]:
    before_summary, before_samples = load_run(before_dir)
    deltas = quantile_deltas(before_samples, after_samples)
    regressed = [
        f"{entry}: {q} {d['before_ms']:.1f} -> {d['after_ms']:.1f} ms "
        f"({d['delta_ms']:+.1f} ms, noise band ±{d['band_ms']:.1f} ms)"
        for entry, per_q in deltas.items()
        for q, d in per_q.items()
        if d["verdict"] == "regressed"
    ]
    g0 = (before_summary.get("gateway") or {}).get("cpu_ms_per_request")
    g1 = (after_summary.get("gateway") or {}).get("cpu_ms_per_request")
    s0 = (before_summary.get("sidecar_process") or {}).get("cpu_ms_per_request")
    s1 = (after_summary.get("sidecar_process") or {}).get("cpu_ms_per_request")
    return {
        "before": str(before_dir),
        "method": (
            f"noise band = sum of the two runs' {CONFIDENCE:.0%} distribution-free "
            f"confidence half-widths (order statistics of each run's own client samples), "
            f"at least {FLOOR_MS:g} ms or {FLOOR_REL:.0%} of the before value; any p50/p95/p99 "
            f"beyond its band is a regression"
        ),
        "entries": deltas,
        "regressed": regressed,
        "profile": profile_diff(before_summary, after_summary),
        "gateway_cpu_ms_per_request": {"before": g0, "after": g1},
        "sidecar_cpu_ms_per_request": {"before": s0, "after": s1},
    }
