"""Connection exhaustion under a common container limit of 1024 file descriptors: a
real sidecar process started by `prlimit --nofile=1024`, 1,100 idle client connections.
Past SIDECAR_MAX_CONNECTIONS (default 90% of the limit) new proxy connections are
closed at once, so `/healthz` (a liveness probe) and the upstream pool keep working."""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import sys
import time
import urllib.request

import pytest

from .process import (
    SyncProcess,
    sidecar_env,
    start_upstream,
    started_ports,
    wait_connections_taken,
)

IDLE = 1100


def start_limited_sidecar(upstream: str) -> tuple[SyncProcess, int, int]:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is installed by make test"
    env = sidecar_env(upstream, SIDECAR_CLIENT_HEADER_TIMEOUT_S="120")
    sc = SyncProcess([prlimit, "--nofile=1024:1024", sys.executable, "-m", "sidecar", "run"], env)
    assert sc.proc.stderr is not None
    for line in sc.proc.stderr:
        ports = started_ports(line)
        if ports is not None:
            return sc, *ports
    sc.stop()
    raise RuntimeError("sidecar did not start")


def healthz_ms(admin_port: int) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=2) as r:
        assert r.status == 200
    return (time.perf_counter() - t0) * 1000


def get(port: int, sock: socket.socket | None = None) -> bytes:
    own = sock is None
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(b"GET /echo/1 HTTP/1.1\r\nHost: t\r\n\r\n")
        return sock.recv(65536)
    finally:
        if own:
            sock.close()


@pytest.mark.slow
@pytest.mark.tools
def test_idle_connection_flood_under_1024_fds_leaves_health_and_proxy_working() -> None:
    up, up_port = start_upstream()
    sc, port, admin_port = start_limited_sidecar(f"http://127.0.0.1:{up_port}")
    socks: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_connections_taken(admin_port, IDLE)
        samples = [healthz_ms(admin_port) for _ in range(20)]
        # an accepted connection still proxies (the pool has descriptors left) ...
        assert get(port, socks[0]).startswith(b"HTTP/1.1 200")
        # ... and one past the cap was closed at once instead of eating a descriptor
        refused = 0
        for s in socks[-50:]:
            s.settimeout(0.2)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                refused += s.recv(1) == b""
        assert refused == 50
        assert sc.proc.poll() is None
        print(
            f"\n/healthz with {IDLE} idle connections under ulimit -n 1024: "
            f"median {statistics.median(samples):.2f} ms, max {max(samples):.2f} ms"
        )
        assert statistics.median(samples) < 100
    finally:
        for s in socks:
            s.close()
        sc.stop()
        up.stop()
    # the sidecar's own view: refusals counted by reason
