"""Untrusted text made safe to print: for labels, events, log lines and the terminal.

A client controls request paths (percent-decoded by aiohttp, so ``%0a`` is a newline)
and header values (non-UTF-8 bytes arrive as lone surrogates). Before such text reaches
a label, an event, a log line or a terminal, every character Python does not call
printable (C0/C1 controls such as newline and ESC, DEL, lone surrogates, format
characters such as the bidi override U+202E, line/paragraph separators) is written as
a visible escape: ``\\x0a``, ``\\x1b``, ``\\u202e``; a lone surrogate from a raw byte
shows that byte (``\\xff``). Leaf module: no imports from the package.
"""

from __future__ import annotations

ELLIPSIS = "…"
REQUEST_ID_MAX = 128  # a client's X-Request-Id in an event or an answer, at most


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte smuggled in by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (fast when there is none)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def header_safe(text: str, limit: int) -> str:
    """``text`` as it is when printable ASCII, else escaped, cut to ``limit`` and made
    ASCII: fit for a response header and for JSON (a lone surrogate is neither)."""
    if text.isascii() and text.isprintable():
        return text
    return untrusted(text, limit).encode("ascii", "backslashreplace").decode("ascii")


def bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending in `…` when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS


def untrusted(text: str, limit: int) -> str:
    """Printable and at most ``limit`` characters: a client-supplied value for an event."""
    # escaping never shortens: the first limit + 1 characters decide the result
    return bounded(printable(text[: limit + 1]), limit)
