"""Header rewriting between client and upstream (RFC 9110 section 7.6.1), on raw bytes.

Headers are forwarded as the parser received them: the same bytes, case, order and
repeats (`request.raw_headers` and the upstream message's `raw_headers`), so a
non-UTF-8 value or a name spelt `ETag` arrives exactly as it was sent. The parser
(aiohttp's llhttp) has already refused what is not HTTP (CR/LF/NUL inside a value,
oversized lines), so nothing here needs escaping. What changes:

- hop-by-hop headers, and those named in ``Connection``, are dropped both ways;
  ``Host`` and ``Content-Length`` cannot be named hop-by-hop (a client must not strip
  the upstream's routing or framing);
- upstream-bound: ``Expect`` dropped (the proxy answers 100-continue itself),
  ``X-Forwarded-For`` appended to, ``X-Forwarded-Proto``/``-Host`` added when absent,
  ``X-Request-Id`` added when absent, ``Host`` added when absent (HTTP/1.0) or
  replaced by the authority of an absolute-form target;
- a protocol upgrade (WebSocket) gets its ``Upgrade`` and ``Connection: Upgrade``
  back (`upgrade_head`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from multidict import istr

RawHeaders = Sequence[tuple[bytes, bytes]]

# Hop-by-hop: meaningful for one connection only. RFC 9110 7.6.1 names Connection,
# Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and Upgrade; the RFC 2616 list
# adds Trailer and the Proxy-Authenticate/-Authorization pair. Compared lower-cased.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_NEVER_NOMINATED = frozenset({b"host", b"content-length", b"keep-alive", b"close", b"upgrade"})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})
X_REQUEST_ID = istr("X-Request-Id")
EXPECT = istr("Expect")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32


MAX_HEADERS = 128  # aiohttp's default limit, enforced here whatever the aiohttp release
_COLON_JOIN = b": ".join


class BadRequest(Exception):
    """A request the proxy refuses to forward (RFC 9112 section 3.2: Host)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# what request_head does with a header, by lower-cased name (absent: keep it)
_HOST, _XFF, _DROP, _XFP, _XFH, _CONNECTION = range(6)
_REQUEST_ACTIONS = {
    **{name: _DROP for name in HOP_BY_HOP},
    b"expect": _DROP,
    b"connection": _CONNECTION,
    b"host": _HOST,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
}


def _nominated(raw: RawHeaders) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (lower-cased), except protected ones."""
    names = set()
    for name, value in raw:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in _NEVER_NOMINATED:
                    names.add(token)
    return frozenset(names)


def end_to_end(raw: RawHeaders) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers of ``raw``: order, case, bytes and repeats kept.

    Runs for every response: one pass, which parses ``Connection`` only when it is
    more than one plain token (``keep-alive``, ``close``); a second pass over what
    is kept, for the headers it names, only then (upstreams seldom do). Half the
    instructions of a `_nominated` pass plus a filtering one (7k less for five
    headers, `keep-alive` among them)."""
    kept: list[tuple[bytes, bytes]] = []
    keep = kept.append
    nominates = False
    for pair in raw:
        name = pair[0].lower()
        if name not in HOP_BY_HOP:
            keep(pair)
        elif name == b"connection" and not nominates:
            nominates = pair[1].strip().lower() not in _PLAIN_CONNECTION
    if nominates:
        nominated = _nominated(raw)
        if nominated:
            kept = [pair for pair in kept if pair[0].lower() not in nominated]
    return kept


def request_head(
    method: str,
    target: bytes,
    raw: RawHeaders,
    *,
    peer: str | None,
    scheme: str,
    request_id: str | None,
    host: bytes | None,
    default_host: bytes,
    chunked: bool = False,
    http11: bool = True,
) -> bytes:
    """The complete HTTP/1.1 request head for the upstream.

    ``request_id`` is the id to add (None when the client sent its own, which then
    goes through untouched); ``host`` replaces the client's Host (the authority of an
    absolute-form target), ``default_host`` is used when the request has none;
    ``chunked``: the body goes upstream chunked (it had no Content-Length);
    ``http11``: the client spoke HTTP/1.1, which requires exactly one Host.
    One pass over the headers (this runs for every request). Raises `BadRequest`.
    """
    if len(raw) > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} request headers")
    kept: list[tuple[bytes, bytes]] = []
    keep = kept.append
    forwarded_for: list[bytes] = []
    seen_proto = seen_fwd_host = nominates = False
    client_host: bytes | None = None
    actions = _REQUEST_ACTIONS
    for pair in raw:
        action = actions.get(pair[0].lower())
        if action is None:
            keep(pair)
        elif action == _HOST:
            if client_host is not None:
                raise BadRequest(400, "more than one Host header")
            client_host = pair[1]
            keep(pair if host is None else (pair[0], host))
        elif action == _XFF:
            forwarded_for.append(pair[1])
        elif action == _CONNECTION:
            nominates = nominates or pair[1].strip().lower() not in _PLAIN_CONNECTION
        elif action == _XFP:
            seen_proto = True
            keep(pair)
        elif action == _XFH:
            seen_fwd_host = True
            keep(pair)
    if nominates:  # Connection names more headers: drop those too
        nominated = _nominated(raw)
        kept = [pair for pair in kept if pair[0].lower() not in nominated]
    if client_host is None:
        if http11 and host is None:
            raise BadRequest(400, "HTTP/1.1 request without Host")
        client_host = host or default_host
        kept.append((b"Host", client_host))
    if peer:
        forwarded_for.append(peer.encode("ascii", "replace"))
    if forwarded_for:
        kept.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    if not seen_proto:
        kept.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if not seen_fwd_host:
        kept.append((b"X-Forwarded-Host", host if host is not None else client_host))
    if request_id is not None:
        kept.append((b"X-Request-Id", request_id.encode("ascii")))
    if chunked:
        kept.append((b"Transfer-Encoding", b"chunked"))
    return head_bytes(method.encode("ascii") + b" " + target + b" HTTP/1.1", kept)


def upgrade_head(head: bytes, protocols: bytes) -> bytes:
    """``head`` (from `request_head`, which drops the hop-by-hop ``Upgrade`` and
    ``Connection``) asking the upstream to switch to ``protocols`` (the client's
    ``Upgrade`` value): ``Connection: Upgrade`` and ``Upgrade`` go back in. The
    ``Sec-WebSocket-*`` headers are end-to-end and went through already."""
    return head[:-2] + b"Connection: Upgrade\r\nUpgrade: " + protocols + b"\r\n\r\n"


def head_bytes(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A message head: the start line, then ``name: value`` lines, then an empty line."""
    return b"\r\n".join([start_line, *map(_COLON_JOIN, headers), b"", b""])


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None if absent or invalid."""
    if not traceparent:
        return None
    m = _TRACEPARENT.fullmatch(traceparent.strip())
    if not m or m.group(1) == _ZERO_TRACE or traceparent.startswith("ff"):
        return None
    return m.group(1)
