"""`latency-sidecar demo` runs, shows all three kinds of traffic, exits 0 (issue 3)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_and_exits_cleanly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--duration",
            "4",
            "--refresh",
            "1",
            "--rps",
            "60",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.rsplit("last 60s window", 1)[1]
    rows = {tuple(line.split()[:2]) for line in last.splitlines() if line.startswith("/")}
    assert ("/v1/chat/completions", "unary") in rows
    assert ("/v1/embeddings", "unary") in rows
    assert ("/v1/chat/completions", "stream") in rows
    assert "admin" in out.stdout and "/percentiles" in out.stdout
    assert "demo finished" in out.stdout
    assert "Traceback" not in out.stderr


async def test_demo_receiver_verifies_signatures_except_on_unsigned_paths():
    import time

    import aiohttp

    from sidecar.demo.receiver import receiver_app
    from sidecar.sinks.webhook import sign

    from .conftest import serve_app

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    app = receiver_app(secret, ["/hooks/alertmanager"])
    body = b'{"type": "breach"}'
    ts = int(time.time())
    signed = {"webhook-id": "m1", "webhook-timestamp": str(ts),
              "webhook-signature": sign(secret, "m1", ts, body)}  # fmt: skip
    async with serve_app(app) as url, aiohttp.ClientSession() as client:

        async def post(path: str, data: bytes, headers: dict[str, str]) -> int:
            async with client.post(url + path, data=data, headers=headers) as r:
                return r.status

        assert await post("/hooks/latency", body, signed) == 204
        assert await post("/hooks/latency", body, {}) == 401  # unsigned
        assert await post("/hooks/latency", b'{"type": "x"}', signed) == 401  # forged
        # Alertmanager's path: no signature needed, and only that path
        assert await post("/hooks/alertmanager", b'{"alerts": []}', {}) == 204
        assert await post("/hooks/alertmanager/x", b'{"alerts": []}', {}) == 401
