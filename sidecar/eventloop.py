"""The event loop every command runs on: uvloop when it is installed (the `speed`
extra), else asyncio's own. Leaf module: the CLI and `analyze` both use it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` to completion on a new loop; its result is the exit code."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
