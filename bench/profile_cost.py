"""What a profile costs proxied traffic: latency at a fixed rate with and without
a `/debug/pprof/cpu?seconds=N` (or `/debug/pprof/block?seconds=N`) running, in
interleaved rounds.

    python bench/profile_cost.py [--rounds 3] [--seconds 10] [--rate 500] [--profile cpu|block]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (
    DELAY_LUA,
    UPSTREAM_SERVER,
    free_port,
    pinned,
    start_nginx,
    wait_port,
    wrk_fixed_rate,
)

TOKEN = "bench-profile-token-" + "x" * 24


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--profile", choices=("cpu", "block"), default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        up_port, port, prof_port = free_port(), free_port(), free_port()
        nginx = start_nginx(
            tmp, "up", UPSTREAM_SERVER.format(port=up_port, body='{"ok":1}', sse=free_port()), 0
        )
        env = {
            **os.environ,
            "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{up_port}",
            "SIDECAR_LISTEN": f"127.0.0.1:{port}",
            "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            "SIDECAR_PROFILING_ENABLED": "true",
            "SIDECAR_PROFILING_TOKEN": TOKEN,
            "SIDECAR_PROFILING_LISTEN": f"127.0.0.1:{prof_port}",
            "SIDECAR_LOG_LEVEL": "warning",
        }
        sidecar = subprocess.Popen(pinned(1, [sys.executable, "-m", "sidecar", "run"]), env=env)
        lua = Path(tmp) / "delay.lua"
        lua.write_text(DELAY_LUA)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            wait_port(up_port)
            wait_port(port)
            wait_port(prof_port)
            wrk_fixed_rate(url, args.rate, 2, str(lua))  # warm-up
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "profiling": []}
            for rnd in range(args.rounds):
                runs["plain"].append(wrk_fixed_rate(url, args.rate, args.seconds, str(lua)))
                profile: list[bytes] = []
                req = urllib.request.Request(
                    f"http://127.0.0.1:{prof_port}/debug/pprof/{args.profile}?seconds={args.seconds}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )

                def take(req: urllib.request.Request = req, sink: list[bytes] = profile) -> None:
                    with urllib.request.urlopen(req, timeout=args.seconds + 30) as r:
                        sink.append(r.read())

                t = threading.Thread(target=take)
                t.start()
                runs["profiling"].append(wrk_fixed_rate(url, args.rate, args.seconds, str(lua)))
                t.join()
                expected = b"samples over" if args.profile == "cpu" else b"block profile of"
                assert profile and expected in profile[0], profile
                print(
                    f"round {rnd + 1}: plain p50 {runs['plain'][-1]['p50']:.3f} p99 "
                    f"{runs['plain'][-1]['p99']:.3f} ms | profiling p50 "
                    f"{runs['profiling'][-1]['p50']:.3f} p99 {runs['profiling'][-1]['p99']:.3f} ms",
                    flush=True,
                )
        finally:
            sidecar.terminate()
            nginx.terminate()
            sidecar.wait(30)
            nginx.wait(10)
    for kind, rs in runs.items():
        p50 = statistics.median(r["p50"] for r in rs)
        p99 = statistics.median(r["p99"] for r in rs)
        print(f"{kind:<10} @{args.rate} rps: median p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    d50 = statistics.median(r["p50"] for r in runs["profiling"]) - statistics.median(
        r["p50"] for r in runs["plain"]
    )
    d99 = statistics.median(r["p99"] for r in runs["profiling"]) - statistics.median(
        r["p99"] for r in runs["plain"]
    )
    print(
        f"a {args.seconds} s {args.profile} profile adds {d50:+.3f} ms to the median and "
        f"{d99:+.3f} ms to the p99 of proxied latency"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
