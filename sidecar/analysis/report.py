"""The self-contained HTML report: plots (matplotlib PNGs as data URIs), tables, the
comparison and the recommendations. No external resource; a few lines of script only
check that every embedded image decoded (and say so on the console if not)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Sequence
from typing import Any

from .load import ENTRIES, Sample
from .recommend import Finding, _where
from .summary import by_entry, cpu_series, overhead_series, rolling_client, sidecar_view

CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) {
      console.error("report image did not decode: " + img.alt);
    }
  }
});
</script>"""
# only the script above may run, and nothing may be fetched: whatever a hostile target
# managed to put into the page stays text (every value is escaped as well)
_SCRIPT_HASH = base64.b64encode(
    hashlib.sha256(
        CHECK_IMAGES.removeprefix("<script>").removesuffix("</script>").encode()
    ).digest()
).decode()
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'"
)
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#176b2c;font-weight:600}.fail{color:#b3261e;font-weight:600}
.muted{color:#666}img{max-width:100%;border:1px solid #eee;margin:6px 0}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _n(value: Any) -> float:
    """A number the target reported, or NaN if it is not one (it may be hostile)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int of 400 digits
        return math.inf


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def plots(
    summary: dict[str, Any],
    samples: Sequence[Sample],
    captures: Sequence[dict[str, Any]],
    comparison: dict[str, Any] | None,
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    # route labels come from clients and function names from the target: "$...$" in
    # them is text, not mathtext (which fails on what it cannot parse)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    t0 = min([s.t for s in samples] + [c["t"] for c in captures] or [0.0])
    groups = by_entry(samples)
    entries = [e for e in ENTRIES if e in groups] + sorted(set(groups) - set(ENTRIES))
    at = [c["t"] for c in captures]
    window = float(captures[-1]["percentiles"].get("windows_s", [60])[0]) if captures else 60.0
    if entries:
        fig, axes = plt.subplots(len(entries), 1, figsize=(10, 2.6 * len(entries)), squeeze=False)
        for ax, entry in zip(axes[:, 0], entries, strict=True):
            rows = groups[entry]
            ax.scatter([s.t - t0 for s in rows], [s.ms for s in rows], s=4, alpha=0.25,
                       color="#888", label="client, each request")  # fmt: skip
            if at:
                xs = [t - t0 for t in at]
                client = rolling_client(rows, at, window, 0.95)
                ax.plot(xs, [float("nan") if v is None else v for v in client], color="#1f77b4",
                        label=f"client p95 (trailing {window:g} s)")  # fmt: skip
                side = [sidecar_view(c["percentiles"], entry).get("p95_ms") for c in captures]
                ax.plot(xs, [float("nan") if v is None else v for v in side], color="#d62728",
                        linestyle="--", label=f"sidecar p95 ({window:g} s window)")  # fmt: skip
            ax.set_title(entry, fontsize=10)
            ax.set_ylabel("ms")
            ax.legend(fontsize=8, loc="upper left")
        axes[-1, 0].set_xlabel("seconds since start")
        fig.tight_layout()
        out["latency"] = _png(fig)
    series = overhead_series(captures)
    if series:
        fig, ax = plt.subplots(figsize=(10, 2.8))
        for route, pts in sorted(series.items()):
            ax.plot([t - t0 for t, _ in pts], [v for _, v in pts], marker=".", label=route)
        ax.set_title("sidecar overhead: mean per interval (sidecar_overhead_seconds)", fontsize=10)
        ax.set_ylabel("ms")
        ax.set_xlabel("seconds since start")
        ax.legend(fontsize=8)
        out["overhead"] = _png(fig)
    gw = cpu_series(captures, "target")
    sc = cpu_series(captures, "sidecar")
    if gw or sc:
        fig, ax = plt.subplots(figsize=(10, 2.8))
        if gw:
            ax.plot([t - t0 for t, _ in gw], [v for _, v in gw], label="gateway CPU %")
        if sc:
            ax.plot([t - t0 for t, _ in sc], [v for _, v in sc], label="sidecar CPU %")
        ax.set_ylabel("% of one core")
        ax.set_xlabel("seconds since start")
        rss = [
            (c["t"], float(v))
            for c in captures
            if (v := (c["stats"].get("target") or {}).get("rss_bytes"))
        ]
        if rss:
            ax2 = ax.twinx()
            ax2.plot([t - t0 for t, _ in rss], [v / 2**20 for _, v in rss], color="#2ca02c",
                     linestyle=":", label="gateway RSS MiB")  # fmt: skip
            ax2.set_ylabel("MiB")
            ax2.legend(fontsize=8, loc="upper right")
        ax.set_title("gateway and sidecar CPU, gateway RSS (/stats)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        out["process"] = _png(fig)
    if captures:
        fig, ax = plt.subplots(figsize=(10, 2.4))
        xs = [c["t"] - t0 for c in captures]
        cur = [(c["stats"].get("sidecar") or {}).get("event_loop_lag_ms") or 0 for c in captures]
        mx = [
            (c["stats"].get("sidecar") or {}).get("event_loop_lag_max_1m_ms") or 0 for c in captures
        ]
        ax.plot(xs, cur, marker=".", label="current")
        ax.plot(xs, mx, linestyle="--", label="max over the last minute")
        ax.set_title("sidecar event-loop lag (how late a 100 ms timer fires)", fontsize=10)
        ax.set_ylabel("ms")
        ax.set_xlabel("seconds since start")
        ax.legend(fontsize=8)
        out["lag"] = _png(fig)
    funcs = (summary.get("profile") or {}).get("functions", [])[:15]
    if funcs:
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(funcs) + 1))
        names = [f["function"][:90] for f in reversed(funcs)]
        ax.barh(names, [f["self"] * 100 for f in reversed(funcs)], label="self")
        ax.barh(names, [f["cum"] * 100 for f in reversed(funcs)], alpha=0.3, label="cumulative")
        ax.set_xlabel("% of the busy samples of the event-loop thread (idle excluded)")
        ax.set_title("top sidecar functions (CPU profile under load)", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8)
        out["functions"] = _png(fig)
    stacks = [s for s in ((summary.get("block") or {}).get("stacks") or [])][:10]
    if stacks:
        fig, ax = plt.subplots(figsize=(10, 0.4 * len(stacks) + 1))
        names = [("(idle) " if s["idle"] else "") + _where(s["frames"])[:90] for s in stacks]
        ax.barh(list(reversed(names)), [s["blocked_ms"] for s in reversed(stacks)],
                color="#b3261e")  # fmt: skip
        ax.set_xlabel("ms the event loop was held")
        ax.set_title("blocked stacks (block profile)", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        out["blocked"] = _png(fig)
    if comparison and comparison["entries"]:
        names = list(comparison["entries"])
        fig, ax = plt.subplots(figsize=(10, 2.8))
        pos = range(len(names))
        before = [comparison["entries"][n]["p95"]["before_ms"] for n in names]
        after = [comparison["entries"][n]["p95"]["after_ms"] for n in names]
        band = [comparison["entries"][n]["p95"]["band_ms"] or 0 for n in names]
        ax.bar([x - 0.2 for x in pos], before, width=0.4, label="before")
        ax.bar([x + 0.2 for x in pos], after, width=0.4, yerr=band, capsize=4,
               label="after (error bar: noise band)")  # fmt: skip
        ax.set_xticks(list(pos), names, fontsize=8)
        ax.set_ylabel("p95 ms")
        ax.set_title("p95 before and after", fontsize=10)
        ax.legend(fontsize=8)
        out["compare"] = _png(fig)
    return out


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def render(
    meta: dict[str, Any],
    summary: dict[str, Any],
    samples: Sequence[Sample],
    captures: Sequence[dict[str, Any]],
    comparison: dict[str, Any] | None,
    found: Sequence[Finding],
    notes: Sequence[str],
) -> str:
    img = plots(summary, samples, captures, comparison)
    e = html.escape
    gate = summary["gate"]
    verdict = meta["verdict"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>latency-sidecar analysis {e(meta['started_at'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>latency-sidecar analysis — {e(meta['started_at'])}</h1>",
        f"<p>Target: {e(meta['target'])}. Load: {e(meta['load'])}, {meta['duration_s']:g} s. "
        f"{summary['requests']} requests, {summary['errors']} errors "
        f"({summary['error_rate']:.1%}).</p>",
        f"<p>Verdict: <span class={'pass' if verdict == 0 else 'fail'}>"
        f"{'PASS' if verdict == 0 else 'FAIL'}</span> (exit {verdict}). "
        + e("; ".join(meta["reasons"]) or "no p95 over the gate, no regression")
        + "</p>",
        "<h2>Latency per route (client side, exact)</h2>",
        "<table><tr><th>entry</th><th>requests</th><th>errors</th><th>p50 ms</th>"
        "<th>p95 ms</th><th>p95 99% bounds</th><th>p99 ms</th><th>sidecar p50 / p95 / p99</th>"
        "<th>sidecar TTFT / TPOT p95</th>"
        f"<th>gate {summary['p95_ms']:g} ms</th></tr>",
    ]
    for entry, d in summary["entries"].items():
        side = d.get("sidecar") or {}
        tokens = d.get("anatomy") or {}
        parts.append(
            f"<tr><td>{e(entry)}</td><td>{d['n']}</td><td>{d['errors']}</td>"
            f"<td>{_ms(d['p50']['value_ms'])}</td><td>{_ms(d['p95']['value_ms'])}</td>"
            f"<td>{_ms(d['p95']['low_ms'])} .. {_ms(d['p95']['high_ms'])}</td>"
            f"<td>{_ms(d['p99']['value_ms'])}</td>"
            f"<td>{_ms(side.get('p50_ms'))} / {_ms(side.get('p95_ms'))} / "
            f"{_ms(side.get('p99_ms'))}</td>"
            f"<td>{_ms(tokens.get('ttft', {}).get('p95_ms'))} / "
            f"{_ms(tokens.get('tpot', {}).get('p95_ms'))}</td><td>{e(d['gate'])}</td></tr>"
        )
    parts.append(
        "</table><p class=muted>Gate rule: a p95 is over the gate only when its "
        "distribution-free 99% lower confidence bound (an order statistic) is above it, "
        "within only when the upper bound is at or below it; otherwise there are too few "
        "samples to tell and there is no verdict. Sidecar figures: its shortest rolling "
        "window at the end of the run; TTFT / TPOT: time to the first token and per "
        'output token of streams (README "Latency anatomy").</p>'
    )
    if summary.get("saturated_captures"):
        parts.append(
            f"<p class=fail>The sidecar said <code>saturated</code> in "
            f"{summary['saturated_captures']} of {summary.get('captures', '?')} captures: "
            "its event loop lagged more than 100 ms, so its own timings miss the time "
            "requests waited unread. Trust the client's figures.</p>"
        )
    if gate["undecided"]:
        parts.append("<ul>" + "".join(f"<li>{e(u)}</li>" for u in gate["undecided"]) + "</ul>")
    sections = (
        ("latency", "Latency over time: client vs sidecar"),
        ("overhead", "Sidecar overhead"),
        ("process", "Gateway CPU and RSS"),
        ("lag", "Event-loop lag"),
        ("functions", "Top sidecar functions"),
        ("blocked", "Blocked stacks"),
    )
    for key, title in sections:
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(_img(img[key], title) if key in img else "<p class=muted>no data</p>")
        if key == "overhead" and summary.get("overhead"):
            parts.append("<table><tr><th>route</th><th>requests</th><th>mean overhead ms</th>"
                         "<th>mean latency ms</th><th>share</th></tr>")  # fmt: skip
            for route, o in summary["overhead"].items():
                share = "-" if o["share"] is None else f"{o['share']:.2%}"
                parts.append(
                    f"<tr><td>{e(route)}</td><td>{o['requests']}</td>"
                    f"<td>{o['overhead_mean_ms']:.3f}</td><td>{_ms(o['latency_mean_ms'])}</td>"
                    f"<td>{share}</td></tr>"
                )
            parts.append("</table>")
        if key == "process":
            for who, label in (("gateway", "gateway"), ("sidecar_process", "sidecar")):
                p = summary.get(who) or {}
                if p:
                    per = p.get("cpu_ms_per_request")
                    parts.append(
                        f"<p>{label}: CPU mean {p.get('cpu_percent_mean') or 0:.1f}% "
                        f"(peak {p.get('cpu_percent_max') or 0:.1f}%), "
                        f"{'-' if per is None else f'{per:.3f}'} ms CPU per request, RSS "
                        f"{_n(p.get('rss_end_bytes')) / 2**20:.1f} MiB, threads "
                        f"{e(str(p.get('threads_max')))}</p>"
                    )
        if key == "blocked":
            block = summary.get("block")
            if block:
                parts.append(
                    f"<p>{_n(block.get('stalls')):g} stalls longer than "
                    f"{_n(block.get('threshold_ms')):g} ms, {_n(block.get('blocked_ms')):.1f} "
                    f"ms in total, longest {_n(block.get('max_stall_ms')):.1f} ms.</p>"
                )
                for st in block.get("stacks", [])[:5]:
                    parts.append(
                        f"<pre>{_n(st.get('blocked_ms')):.1f} ms, {_n(st.get('stalls')):g} stalls\n"
                        + e("\n".join(reversed(st["frames"])))
                        + "</pre>"
                    )
    if comparison:
        parts += [
            "<h2>Compared with the previous run</h2>",
            f"<p>Before: {e(comparison['before'])}. {e(comparison['method'])}.</p>",
            _img(img["compare"], "p95 before and after") if "compare" in img else "",
            "<table><tr><th>entry</th><th>quantile</th><th>before ms</th><th>after ms</th>"
            "<th>delta ms</th><th>noise band ms</th><th>verdict</th></tr>",
        ]
        for entry, per_q in comparison["entries"].items():
            for q, d in per_q.items():
                parts.append(
                    f"<tr><td>{e(entry)}</td><td>{q}</td><td>{_ms(d['before_ms'])}</td>"
                    f"<td>{_ms(d['after_ms'])}</td><td>{d['delta_ms']:+.1f}</td>"
                    f"<td>{'-' if d['band_ms'] is None else '±' + _ms(d['band_ms'])}</td>"
                    f"<td>{e(d['verdict'])}</td></tr>"
                )
        parts.append("</table>")
        g = comparison["gateway_cpu_ms_per_request"]
        if g["before"] is not None and g["after"] is not None:
            parts.append(
                f"<p>Gateway CPU per request: {g['before']:.3f} -> {g['after']:.3f} ms.</p>"
            )
        if comparison["profile"]:
            parts.append("<table><tr><th>function</th><th>share</th><th>before</th>"
                         "<th>after</th><th>change</th></tr>")  # fmt: skip
            for r in comparison["profile"]:
                parts.append(
                    f"<tr><td>{e(r['function'])}</td><td>{r['kind']}</td>"
                    f"<td>{r['before']:.1%}</td><td>{r['after']:.1%}</td><td>{r['change']}</td></tr>"
                )
            parts.append("</table>")
        else:
            parts.append("<p>No function's CPU share moved beyond sampling noise.</p>")
    parts.append("<h2>Recommendations</h2>")
    problems = [f for f in found if f.problem]
    if not problems:
        parts.append("<p class=pass>Nothing is wrong: no rule found a problem.</p>")
    parts.append("<ul>")
    for f in found:
        cls = "fail" if f.problem else "muted"
        parts.append(f"<li><span class={cls}>{e(f.title)}</span><br>{e(f.evidence)}</li>")
    parts.append("</ul>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append(CHECK_IMAGES + "</body></html>\n")
    return "\n".join(parts)
