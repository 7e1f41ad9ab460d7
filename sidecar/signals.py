"""Stop signals, the same for every long-running command (`run`, `demo`, ...).

The first SIGTERM or SIGINT asks for a graceful stop (the caller drains); a second one
while draining exits at once with status 128 + signal number, logged, for an operator
who does not want to wait for the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .logs import flush_logging

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """``async with StopSignals() as stop: ... await stop.wait()``."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._event = asyncio.Event()

    async def __aenter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
            log.info("%s received: stopping (send it again to exit at once)", sig.name)
            self._event.set()
            return
        log.warning("second %s: exiting now, without draining", sig.name)
        flush_logging()
        os._exit(128 + sig)

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
