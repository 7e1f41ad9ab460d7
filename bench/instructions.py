"""Instructions per proxied request, counted by callgrind: deterministic on a noisy machine.

The method of bench/README.md, scripted: the proxy runs under
``valgrind --tool=callgrind`` in front of nginx (a small JSON answer, outside valgrind);
one run serves ``--small`` requests, a second ``--large``; both totals include start-up
and shutdown, so their difference divided by ``large - small`` is the cost of one
request. Requests come from a plain socket client, ``--concurrency`` keep-alive
connections, so the client's own cost is not counted.

That difference also holds the once-a-second work (windows advancing, breach rules,
loop-lag probe) of the seconds the larger run lasted longer: under valgrind a request
takes milliseconds, so a busy machine, which slows the runs, moves the figure by
thousands of instructions. A third run (``--idle S``: ``--small`` requests, then S
seconds idle) measures that work per second; the figure without it is printed too and
stays put however loaded the machine is. (Idle seconds are a little cheaper than busy
ones, whose windows take the second's values: that part stays in the per-request
figure, where it belongs.)

    python bench/instructions.py [--proxy sidecar|bare] [--small 1000] [--large 3000]
                                 [--idle 20] [--path /v1/chat/completions]
                                 [--env SIDECAR_X=...]

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
    kind: str, upstream: str, n: int, path: str, concurrency: int, extra_env: dict[str, str],
    idle_s: float = 0.0,
) -> tuple[int, float]:  # fmt: skip
    """Total instructions of one proxy process that served ``n`` requests (+1 probe),
    then idled ``idle_s``; and the seconds it ran after it was ready (its ticking time)."""
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
        ready = time.monotonic()
        try:
            _wait_http(port, 600)  # python under valgrind starts slowly on a busy machine
            ready = time.monotonic()
            _client(port, path, n, concurrency)
            time.sleep(idle_s)
        finally:
            ran = time.monotonic() - ready
            proc.send_signal(signal.SIGTERM)
            proc.wait(180)
        text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError("no totals in the callgrind output")
    return int(m.group(1)), ran


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=["sidecar", "bare"], default="sidecar")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--env", action="append", default=[], metavar="SIDECAR_X=VALUE")
    parser.add_argument(
        "--idle", type=float, default=20.0, metavar="S",
        help="a third run: --small requests, then S seconds idle (0: none)",
    )  # fmt: skip
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
            runs = [(args.small, 0.0), (args.large, 0.0)]
            if args.idle > 0:
                runs.append((args.small, args.idle))
            got = []
            for n, idle in runs:
                total, ran = count_run(
                    args.proxy, upstream, n, args.path, args.concurrency, extra, idle
                )
                got.append((total, ran))
                print(f"{args.proxy}: {n} requests, {idle:.0f} s idle -> {total:,} "
                      f"instructions in {ran:.1f} s", flush=True)  # fmt: skip
        finally:
            nginx.terminate()
            nginx.wait(10)
    (small, small_s), (large, large_s) = got[0], got[1]
    n = args.large - args.small
    per_request = (large - small) / n
    print(f"{args.proxy}: {per_request:,.0f} instructions per request")
    doc: dict[str, object] = {"proxy": args.proxy, "per_request": round(per_request), **extra}
    if args.idle > 0:
        idle, idle_s = got[2]
        per_second = (idle - small) / (idle_s - small_s)
        own = (large - small - per_second * (large_s - small_s)) / n
        print(f"{args.proxy}: {per_second:,.0f} instructions per second of once-a-second "
              f"work (idle); {own:,.0f} per request without it "
              f"(the large run took {large_s - small_s:.1f} s longer)")  # fmt: skip
        doc.update(per_second_idle=round(per_second), per_request_without_ticks=round(own))
    if args.json:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
