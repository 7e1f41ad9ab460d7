"""Binding listeners: each a resource that is bound before anything else starts and
cleaned up on the way out. A port that cannot be bound is a `StartupError` naming the
variable that chose it (the CLI prints it in one line and exits 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from .config import HostPort


class StartupError(Exception):
    """The sidecar cannot start; the message names the variable to change."""


@asynccontextmanager
async def listening(
    runner: web.BaseRunner, where: HostPort, variable: str, *, backlog: int
) -> AsyncIterator[int]:
    """Set up ``runner``, listen on ``where``; yields the bound port."""
    await runner.setup()
    try:
        site = web.TCPSite(runner, where.host, where.port, backlog=backlog, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StartupError(f"{variable}: cannot listen on {where}: {reason}") from None
        yield int(runner.addresses[-1][1])
    finally:
        await close(runner)


async def close(runner: web.BaseRunner) -> None:
    """Stop listening and close the runner's connections (idempotent)."""
    if runner.server is not None:
        await runner.cleanup()
