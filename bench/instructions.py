"""Instructions per proxied request, counted by callgrind: deterministic on a noisy machine.

The method of bench/README.md, scripted: the proxy runs under
``valgrind --tool=callgrind`` in front of nginx (a small JSON answer, outside valgrind);
one run serves ``--small`` requests, a second ``--large``; both totals include start-up
and shutdown, so their difference divided by ``large - small`` is the cost of one
request. Requests come from a plain socket client, ``--concurrency`` keep-alive
connections, so the client's own cost is not counted.

    python bench/instructions.py [--proxy sidecar|bare] [--small 1000] [--large 3000]
                                 [--path /v1/chat/completions] [--env SIDECAR_X=...]

Prints one line per run and the result; ``--json`` prints it as JSON too. Needs valgrind
and nginx (Debian packages of those names).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import (  # noqa: E402
    BODY,
    UPSTREAM_SERVER,
    free_port,
    sidecar_env,
    start_nginx,
    wait_port,
)  # fmt: skip


def _client(port: int, path: str, n: int, concurrency: int) -> None:
    """Send ``n`` GETs over ``concurrency`` keep-alive connections; read each answer."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    errors: list[str] = []

    def worker(count: int) -> None:
        try:
            exchange(count)
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    def exchange(count: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            reader = sock.makefile("rb")
            for _ in range(count):
                sock.sendall(request)
                status = reader.readline()
                if b" 200 " not in status:
                    errors.append(status.decode(errors="replace").strip())
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                reader.read(length)

    threads = [threading.Thread(target=worker, args=(c,)) for c in per if c]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]!r}")


def _wait_http(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _client(port, "/", 1, 1)
            return
        except (OSError, RuntimeError):
            time.sleep(0.5)
    raise RuntimeError(f"proxy on {port} did not answer within {timeout:.0f}s")


def _proxy_argv(kind: str, upstream: str, port: int) -> tuple[list[str], dict[str, str]]:
    env = sidecar_env(upstream, port, free_port())
    if kind == "bare":
        return [sys.executable, str(HERE / "bare_proxy.py"), str(port), upstream], env
    return [sys.executable, "-m", "sidecar", "run"], env


def count_run(
    kind: str, upstream: str, n: int, path: str, concurrency: int, extra_env: dict[str, str]
) -> int:
    """Total instructions of one proxy process that served ``n`` requests (+1 probe)."""
    port = free_port()
    argv, env = _proxy_argv(kind, upstream, port)
    env.update(extra_env)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_http(port, 600)  # python under valgrind starts slowly on a busy machine
            _client(port, path, n, concurrency)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(180)
        text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError("no totals in the callgrind output")
    return int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=["sidecar", "bare"], default="sidecar")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--env", action="append", default=[], metavar="SIDECAR_X=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    extra = dict(e.split("=", 1) for e in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        up_port = free_port()
        nginx = start_nginx(
            tmp, "up", UPSTREAM_SERVER.format(port=up_port, body=BODY, sse=free_port()), 0
        )
        try:
            wait_port(up_port)
            upstream = f"http://127.0.0.1:{up_port}"
            totals = {}
            for n in (args.small, args.large):
                totals[n] = count_run(args.proxy, upstream, n, args.path, args.concurrency, extra)
                print(f"{args.proxy}: {n} requests -> {totals[n]:,} instructions", flush=True)
        finally:
            nginx.terminate()
            nginx.wait(10)
    per_request = (totals[args.large] - totals[args.small]) / (args.large - args.small)
    print(f"{args.proxy}: {per_request:,.0f} instructions per request")
    if args.json:
        print(json.dumps({"proxy": args.proxy, "per_request": round(per_request), **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
