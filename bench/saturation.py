"""Saturation honesty: what clients see vs what the sidecar reports, past its capacity.

    python bench/saturation.py [--connections 2000] [--duration 20] [--source DIR]

Starts nginx as the upstream (a small JSON answer) and `latency-sidecar run` pinned to
one CPU, then wrk with ``--connections`` keep-alive connections on the other CPU: far
more than one Python core serves, so requests queue in the kernel and on the event
loop. Prints wrk's client-side p50/p99 next to the sidecar's own p50/p99 of the same
run (``/percentiles``, route ``*``, the 60 s window), its ``saturated`` flag and
loop lag, and the listen-queue overflow counters' increase.

``--source DIR`` runs the sidecar from another checkout's ``sidecar/`` package (e.g.
``git archive <commit> sidecar | tar -x -C DIR``) with this venv: the before/after of
a change to the request path.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import (  # noqa: E402
    BODY,
    UPSTREAM_SERVER,
    free_port,
    pinned,
    sidecar_env,
    start_nginx,
    wait_port,
)  # fmt: skip


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def _overflows(admin: str) -> float | None:
    m = re.search(r"^sidecar_listen_overflows_total ([\d.e+]+)$", _get(f"{admin}/metrics"), re.M)
    return float(m.group(1)) if m else None


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        up_port = free_port()
        nginx = start_nginx(
            tmp, "up", UPSTREAM_SERVER.format(port=up_port, body=BODY, sse=free_port()), 0
        )
        port, admin_port = free_port(), free_port()
        env = sidecar_env(f"http://127.0.0.1:{up_port}", port, admin_port, "error")
        if args.source:
            env["PYTHONPATH"] = str(Path(args.source).resolve())
        proxy = subprocess.Popen(
            pinned(1, [sys.executable, "-m", "sidecar", "run"]), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        admin = f"http://127.0.0.1:{admin_port}"
        try:
            wait_port(up_port)
            wait_port(port, 60)
            overflows_before = _overflows(admin)
            out = subprocess.run(
                pinned(0, ["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s",
                           "--timeout", "30s", "--latency", f"http://127.0.0.1:{port}/v1/x"]),
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            doc = json.loads(_get(f"{admin}/percentiles"))
            overflows_after = _overflows(admin)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(60)
            nginx.terminate()
            nginx.wait(10)
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    own = doc["routes"]["*"]["60"]
    result: dict[str, object] = {
        "source": args.source or "this checkout",
        "connections": args.connections,
        "rps": float(rps.group(1)) if rps else None,
        "client_p50_ms": _ms(dist["50"]),
        "client_p99_ms": _ms(dist["99"]),
        "sidecar_p50_ms": own.get("p50_ms"),
        "sidecar_p99_ms": own.get("p99_ms"),
        "sidecar_count": own.get("count"),
        "saturated": doc.get("saturated"),
        "loop_lag_max_ms": doc.get("loop_lag_max_ms"),
        "errors": "Socket errors" in out or "Non-2xx" in out,
    }
    if overflows_before is not None and overflows_after is not None:
        result["listen_overflows"] = overflows_after - overflows_before
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--source", default="")
    args = parser.parse_args()
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
