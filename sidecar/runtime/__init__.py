"""Runtime stats of the sidecar, of the gateway process and of the system/container."""

from __future__ import annotations

from .collector import RuntimeCollector
from .looplag import LoopLag
from .stats import RuntimeStats
from .target import Target

__all__ = ["LoopLag", "RuntimeCollector", "RuntimeStats", "Target"]
