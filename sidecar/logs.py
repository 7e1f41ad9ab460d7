"""Logging setup: JSON (or text) lines on stderr, written by a background thread.

Handlers run behind a `QueueHandler`, so a log call on the event loop only enqueues a
record; the write to stderr happens on the listener thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Route the root logger through a queue to stderr. Safe to call again."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _listener = logging.handlers.QueueListener(q, handler, respect_handler_level=True)
    _listener.start()
    atexit.register(flush_logging)


def flush_logging() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
