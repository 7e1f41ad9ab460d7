"""`make loadtest`: the demo gateway behind the sidecar, load from locust, one command.

Starts `latency-sidecar demo-gateway` and `latency-sidecar run` on free ports, runs
loadtest/locustfile.py headless against the sidecar, writes
loadtest/results/report.html (locust's report) and loadtest/results/summary.md
(client vs sidecar percentiles), and exits with locust's code (non-zero on a breach).
Any other option is passed to locust, e.g. ``--load-profile capacity --p95-ms 120``.

To test your own gateway instead, run locust directly:
    locust -f loadtest/locustfile.py --headless --host http://GATEWAY ...
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def main(argv: list[str]) -> int:
    out_dir = Path(os.environ.get("LOADTEST_RESULTS", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gw, proxy, admin = free_port(), free_port(), free_port()
    exe = [sys.executable, "-m", "sidecar"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    procs = [
        subprocess.Popen([*exe, "demo-gateway", "--listen", f"127.0.0.1:{gw}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(
            [*exe, "run"],
            env={**env, "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{gw}",
                 "SIDECAR_LISTEN": f"127.0.0.1:{proxy}",
                 "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_LOG_LEVEL": "warning"},
        ),
    ]  # fmt: skip
    try:
        wait_port(gw)
        wait_port(proxy)
        wait_port(admin)
        cmd = [
            sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
            "--host", f"http://127.0.0.1:{proxy}", "--sidecar-admin", f"http://127.0.0.1:{admin}",
            "--html", str(out_dir / "report.html"), "--summary-file", str(out_dir / "summary.md"),
            "--only-summary", "--loglevel", "WARNING", *argv,
        ]  # fmt: skip
        code = subprocess.call(cmd)
        print(f"report: {out_dir / 'report.html'}\nsummary: {out_dir / 'summary.md'}")
        return code
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
