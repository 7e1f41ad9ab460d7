"""`latency-sidecar demo-receiver`: an example webhook receiver that prints what it
gets, verifying Standard Webhooks signatures when given the secret. Paths listed as
unsigned (Alertmanager's webhooks carry no signature) are accepted without one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable

from aiohttp import web

log = logging.getLogger("sidecar.demo.receiver")
TOLERANCE_S = 300


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification (what any SW library does)."""
    try:
        msg_id = headers["webhook-id"]
        ts = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > TOLERANCE_S:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    return any(
        hmac.compare_digest(sig.partition(",")[2], expected)
        for sig in signatures
        if sig.startswith("v1,")
    )


def receiver_app(secret: str = "", unsigned_paths: Iterable[str] = ()) -> web.Application:
    unsigned = frozenset(unsigned_paths)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        check = bool(secret) and request.path not in unsigned
        if check and not verify(secret, {k.lower(): v for k, v in request.headers.items()},
                                body):  # fmt: skip
            log.warning("rejected a webhook with a bad signature")
            return web.Response(status=401)
        try:
            doc = json.loads(body)
        except json.JSONDecodeError:
            return web.Response(status=400)
        log.info(
            "webhook received",
            extra={"path": request.path, "verified": check, "payload": doc},
        )
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    return app
