"""Logging setup: JSON (or text) lines on stderr, written by a background thread.

Handlers run behind a `QueueHandler`, so a log call on the event loop only enqueues a
record; the write to stderr happens on the listener thread.

Every record is one line whatever it carries: JSON escapes control characters itself;
the text format escapes them in the message and every field (`printable`), so a
client's ``%0a`` cannot forge a line nor ``%1b`` reach a terminal; a traceback follows
on indented lines.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
from typing import Any

from .printable import printable
from .timefmt import iso_ms

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RESERVED and not key.startswith("_")
    }


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if (exc := _traceback(self, record)) is not None:
            doc["exc"] = exc
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message> key=value ...``, control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{self.formatTime(record)} {record.levelname:<7} {record.name}: "
            + printable(record.getMessage())
        ]
        for key, value in _fields(record).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            parts.append(f"{printable(key)}={printable(text)}")
        line = " ".join(parts)
        for block in (_traceback(self, record), record.stack_info):
            if block:
                line += "".join(f"\n    {printable(part)}" for part in block.splitlines())
        return line


class _Enqueue(logging.handlers.QueueHandler):
    """Like `QueueHandler`, but the traceback stays apart from the message (in
    ``exc_text``) so that each formatter lays it out its own way."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.message = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = _PLAIN.formatException(record.exc_info)
            record.exc_info = None
        return record


_PLAIN = logging.Formatter()


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Route the root logger through a queue to stderr. Safe to call again."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(q)]
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
