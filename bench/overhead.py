"""Overhead benchmark: what does the sidecar cost, next to a bare proxy and nginx?

Starts nginx as the upstream (a small JSON answer), then measures, in interleaved
rounds so machine noise hits every configuration alike:
  direct   - the client talks to the upstream nginx
  nginx    - nginx as a reference reverse proxy (1 worker, keep-alive upstream)
  bare     - bench/bare_proxy.py: aiohttp low-level server + uvloop, no observation
  sidecar  - `latency-sidecar run` with everything on (percentiles, metrics, breach
             evaluation, Redis sink)
Each proxy is pinned to CPU 1 and the load generators to CPU 0. Max throughput comes
from wrk; latency at fixed rates from wrk too, paced by its delay() hook; CPU time
per request from the proxy process's own counters.

    python bench/overhead.py [--rounds 3] [--duration 5] [--rates 500,2000]

Prints a table and writes bench/results/latest.json and bench/results/latest.md.
Needs nginx, wrk and redis-server (Debian packages of those names).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BODY = '{"id":"cmpl-1","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sidecar_env(upstream: str, port: int, admin_port: int, log_level: str = "warning",
                **more: str) -> dict[str, str]:  # fmt: skip
    """This process's environment without its SIDECAR_* variables, plus what a benched
    sidecar needs (``more``: further SIDECAR_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(
        SIDECAR_UPSTREAM_URL=upstream,
        SIDECAR_LISTEN=f"127.0.0.1:{port}",
        SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        SIDECAR_LOG_LEVEL=log_level,
        **more,
    )
    return env


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def pinned(cpu: int, argv: list[str]) -> list[str]:
    ncpu = os.cpu_count() or 1
    if shutil.which("taskset") and ncpu > 1:
        return ["taskset", "-c", str(cpu % ncpu), *argv]
    return argv


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    rps: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    fixed: dict[int, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def cpu_seconds(self) -> float:
        """CPU time of the process and its children (nginx's worker)."""
        if self.proc is None:
            return float("nan")
        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
        return total

    def rss_mb(self) -> float:
        if self.proc is None:
            return float("nan")
        return float(psutil.Process(self.proc.pid).memory_info().rss / 2**20)


NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx-{name}.pid;
error_log {tmp}/nginx-{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body-{name};
  proxy_temp_path {tmp}/proxy-{name};
  fastcgi_temp_path {tmp}/fcgi-{name};
  uwsgi_temp_path {tmp}/uwsgi-{name};
  scgi_temp_path {tmp}/scgi-{name};
  keepalive_requests 1000000;
  {body}
}}
"""
UPSTREAM_SERVER = """
  server {{ listen 127.0.0.1:{port} reuseport;
    location / {{ default_type application/json; return 200 '{body}'; }}
    location /v1/stream {{ proxy_pass http://127.0.0.1:{sse}; proxy_http_version 1.1;
                          proxy_buffering off; }} }}
"""
PROXY_SERVER = """
  upstream gw {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://gw; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off; }} }}
"""


def start_nginx(tmp: str, name: str, server_block: str, cpu: int) -> subprocess.Popen[bytes]:
    conf = Path(tmp) / f"nginx-{name}.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, name=name, body=server_block))
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(
        pinned(cpu, [exe, "-c", str(conf), "-p", tmp, "-g", "daemon off;"]),
        stderr=subprocess.DEVNULL,
    )


def wrk_max_rps(url: str, duration: float, connections: int) -> float:
    out = subprocess.run(
        pinned(0, ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", url]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: errors during wrk run on {url}:\n{out}", file=sys.stderr)
    return float(m.group(1))


DELAY_LUA = """
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS"))
function delay() return delay_ms end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_fixed_rate(url: str, rate: int, duration: float, script: str) -> dict[str, float]:
    """~rate req/s: each of N connections waits 20 ms between its requests (wrk's
    delay() hook), so the proxy sees a steady, unsaturated load. Latencies are wrk's
    own (microsecond resolution)."""
    delay_ms = 20
    conns = max(1, round(rate * delay_ms / 1000))
    out = subprocess.run(
        pinned(
            0, ["wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s", "--latency", "-s", script, url]
        ),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_DELAY_MS": str(delay_ms)},
    ).stdout
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", out, re.M))
    if "50" not in dist:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")

    def ms(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
        assert m, text
        return float(m.group(1)) * _UNITS[m.group(2)]

    n = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "p50": ms(dist["50"]),
        "p99": ms(dist["99"]),
        "n": float(n.group(1)) if n else 0.0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "errors": 1.0 if ("Non-2xx" in out or "Socket errors" in out) else 0.0,
    }


def sse_ttfb_ms(port: int, n: int) -> float:
    """Median time to the first SSE event over ``n`` sequential requests (one
    keep-alive connection, like a client holding a pool)."""
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        request = b"GET /v1/stream HTTP/1.1\r\nHost: bench\r\n\r\n"
        for _ in range(n):
            t0 = time.perf_counter()
            sock.sendall(request)
            first = None
            while True:  # headers, then chunked body lines, until [DONE]
                line = reader.readline()
                if not line:
                    raise RuntimeError("connection closed mid-stream")
                if first is None and line.startswith(b"data:"):
                    first = time.perf_counter()
                if line.startswith(b"data: [DONE]"):
                    break
            while reader.readline() not in (b"0\r\n", b""):  # the last chunk
                pass
            reader.readline()
            assert first is not None
            samples.append((first - t0) * 1000)
    return statistics.median(samples)


def rss_after(target: Target, total_requests: int, connections: int) -> tuple[float, float, int]:
    """RSS before and after pushing ``total_requests`` through ``target`` with wrk."""
    before = target.rss_mb()
    done = 0
    while done < total_requests:
        seconds = 10
        out = subprocess.run(
            pinned(0, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", target.url]),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        m = re.search(r"(\d+) requests in", out)
        done += int(m.group(1)) if m else 0
    return before, target.rss_mb(), done


@contextlib.contextmanager
def stack(args: argparse.Namespace) -> Iterator[list[Target]]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sse_port = free_port()
            procs.append(
                subprocess.Popen(
                    pinned(0, [sys.executable, str(HERE / "sse_upstream.py"), str(sse_port)])
                )
            )
            up = Target("direct", free_port())
            up.proc = start_nginx(
                tmp, "up", UPSTREAM_SERVER.format(port=up.port, body=BODY, sse=sse_port), 0
            )
            procs.append(up.proc)
            wait_port(up.port)
            upstream = f"http://127.0.0.1:{up.port}"
            targets = [up]

            ng = Target("nginx", free_port())
            ng.proc = start_nginx(tmp, "px", PROXY_SERVER.format(up=up.port, port=ng.port), 1)
            procs.append(ng.proc)
            targets.append(ng)

            bare = Target("bare", free_port())
            bare.proc = subprocess.Popen(
                pinned(1, [sys.executable, str(HERE / "bare_proxy.py"), str(bare.port), upstream])
            )
            procs.append(bare.proc)
            targets.append(bare)

            redis_port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(redis_port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        tmp,
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            sc = Target("sidecar", free_port())
            env = sidecar_env(upstream, sc.port, free_port(),
                              SIDECAR_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")  # fmt: skip
            sc.proc = subprocess.Popen(pinned(1, [sys.executable, "-m", "sidecar", "run"]), env=env)
            procs.append(sc.proc)
            targets.append(sc)
            for t in targets:
                wait_port(t.port)
            wait_port(sse_port)
            yield [t for t in targets if t.name in args.only]
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def run(args: argparse.Namespace) -> dict[str, object]:
    with stack(args) as targets, tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(DELAY_LUA)
        lua.flush()
        script = lua.name
        for t in targets:  # warm-up: connection pools, code paths, allocator
            wrk_max_rps(t.url, 1, args.connections)
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for t in order:
                rps = wrk_max_rps(t.url, args.duration, args.connections)
                t.rps.append(rps)
                line = f"round {rnd + 1} {t.name:<8} max {rps:8.0f} rps"
                for rate in args.rates:
                    cpu0 = t.cpu_seconds()
                    fixed = wrk_fixed_rate(t.url, rate, args.duration, script)
                    fixed["cpu_us"] = (t.cpu_seconds() - cpu0) / max(1, fixed["n"]) * 1e6
                    t.fixed.setdefault(rate, []).append(fixed)
                    line += (
                        f" | @{fixed['rps']:.0f} rps p50 {fixed['p50']:.3f}"
                        f" p99 {fixed['p99']:.3f} ms"
                    )
                print(line, flush=True)
            for t in targets:
                t.ttfb.append(sse_ttfb_ms(t.port, args.sse_requests))
            print("  sse ttfb ms: " + ", ".join(f"{t.name} {t.ttfb[-1]:.3f}" for t in order),
                  flush=True)  # fmt: skip
        rss = {t.name: round(t.rss_mb(), 1) for t in targets}
        soak: dict[str, object] = {}
        sidecar = next((t for t in targets if t.name == "sidecar"), None)
        if sidecar is not None and args.rss_requests:
            before, after, done = rss_after(sidecar, args.rss_requests, args.connections)
            soak = {"requests": done, "rss_mb_before": round(before, 1),
                    "rss_mb_after": round(after, 1)}  # fmt: skip
            print(f"sidecar RSS {before:.1f} MB -> {after:.1f} MB after {done} requests")

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    summary: dict[str, dict[str, object]] = {}
    for t in targets:
        entry: dict[str, object] = {"max_rps": med(t.rps), "rss_mb": rss[t.name],
                                    "sse_ttfb_ms": med(t.ttfb)}  # fmt: skip
        for rate, runs in t.fixed.items():
            entry[f"{rate}rps"] = {
                k: med([r[k] for r in runs]) for k in ("p50", "p99", "cpu_us")
            } | {"errors": sum(int(r["errors"]) for r in runs)}
        summary[t.name] = entry
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "rates": args.rates,
        },
        "results": summary,
        "soak": soak,
    }


def markdown(doc: dict[str, object]) -> str:
    results = doc["results"]
    assert isinstance(results, dict)
    rates = doc["params"]["rates"]  # type: ignore[index]
    head = (
        "| config | max rps |"
        + "".join(f" p50 @{r} (ms) | p99 @{r} (ms) | CPU µs/req @{r} |" for r in rates)
        + " SSE first event (ms) |"
    )
    lines = [head, "|" + "---|" * (3 + 3 * len(rates))]
    for name, e in results.items():
        row = f"| {name} | {e['max_rps']:.0f} |"
        for r in rates:
            f = e[f"{r}rps"]
            row += f" {f['p50']:.3f} | {f['p99']:.3f} | {f['cpu_us']:.0f} |"
        lines.append(row + f" {e['sse_ttfb_ms']:.3f} |")
    if "bare" in results and "sidecar" in results:
        b, s = results["bare"], results["sidecar"]
        lines.append("")
        lines.append(f"- sidecar / bare max throughput: **{s['max_rps'] / b['max_rps']:.2f}x**")
        for r in rates:
            bf, sf = b[f"{r}rps"], s[f"{r}rps"]
            lines.append(
                f"- at {r} rps: sidecar p50 {sf['p50'] - bf['p50']:+.3f} ms vs bare, "
                f"p99 {sf['p99'] / bf['p99']:.2f}x bare"
            )
    if "direct" in results and "sidecar" in results:
        d, s = results["direct"], results["sidecar"]
        for r in rates:
            lines.append(
                f"- at {r} rps: sidecar p50 {s[f'{r}rps']['p50'] - d[f'{r}rps']['p50']:+.3f} ms"
                " vs direct"
            )
        lines.append(
            f"- time to first SSE event: sidecar {s['sse_ttfb_ms'] - d['sse_ttfb_ms']:+.3f} ms"
            " vs direct"
        )
    soak = doc.get("soak")
    if isinstance(soak, dict) and soak:
        lines.append(
            f"- sidecar RSS {soak['rss_mb_before']} MB before, {soak['rss_mb_after']} MB after "
            f"{soak['requests']:,} more requests"
        )
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, object], path: Path) -> bool:
    """Throughput and added latency per configuration, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no chart")
        return False
    results = doc["results"]
    assert isinstance(results, dict)
    rates = doc["params"]["rates"]  # type: ignore[index]
    names = list(results)
    direct = results.get("direct")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [results[n]["max_rps"] for n in names], color="#4c72b0")
    ax1.set_title("max throughput (req/s)")
    ax1.set_yscale("log")
    for i, n in enumerate(names):
        ax1.annotate(f"{results[n]['max_rps']:.0f}", (i, results[n]["max_rps"]),
                     ha="center", va="bottom", fontsize=8)  # fmt: skip
    width = 0.8 / max(1, len(rates))
    for j, r in enumerate(rates):
        base = direct[f"{r}rps"]["p50"] if direct else 0.0
        ax2.bar([i + j * width for i in range(len(names))],
                [results[n][f"{r}rps"]["p50"] - base for n in names], width,
                label=f"p50 added @{r} rps")  # fmt: skip
    ax2.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(names))], names)
    ax2.set_title("latency added vs direct (ms)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"latency-sidecar overhead, {doc['generated_at']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--rates", default="500,2000", help="fixed rates for latency")
    p.add_argument("--sse-requests", type=int, default=200, help="SSE requests per round")
    p.add_argument("--rss-requests", type=int, default=1_000_000,
                   help="requests pushed through the sidecar before its last RSS reading "
                   "(0: skip)")  # fmt: skip
    p.add_argument("--only", default="direct,nginx,bare,sidecar")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "latest"), help="path prefix of outputs")
    args = p.parse_args()
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.only = set(args.only.split(","))
    for tool in ("nginx", "wrk", "redis-server"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"missing {tool}: apt-get install nginx-light wrk redis-server")
            return 2
    doc = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    out.with_suffix(".md").write_text(md)
    if not args.no_chart:
        chart(doc, out.with_suffix(".png"))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
