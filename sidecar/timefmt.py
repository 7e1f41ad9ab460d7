"""Wall-clock timestamps as the SPEC writes them: ISO 8601 UTC, milliseconds, ``Z``."""

from __future__ import annotations

import time


def iso_ms(ts: float) -> str:
    """``time.time()`` seconds -> ``2026-11-27T10:00:00.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
