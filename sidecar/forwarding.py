"""Header rewriting between client and upstream (RFC 9110 section 7.6.1)."""

from __future__ import annotations

import random
import re

from multidict import CIMultiDict, CIMultiDictProxy, istr

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# Hop-by-hop: meaningful for one connection only, never forwarded. RFC 9110 7.6.1 names
# Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and Upgrade; the
# RFC 2616 list adds Trailer and the Proxy-Authenticate/-Authorization pair.
HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
    )
)
X_REQUEST_ID = istr("X-Request-Id")
X_FORWARDED_FOR = istr("X-Forwarded-For")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
X_FORWARDED_HOST = istr("X-Forwarded-Host")
CONNECTION = istr("Connection")
EXPECT = istr("Expect")
HOST = istr("Host")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32


def _connection_named(headers: Headers) -> set[istr]:
    named: set[istr] = set()
    for value in headers.getall(CONNECTION, ()):
        named.update(istr(tok.strip()) for tok in value.split(",") if tok.strip())
    return named


def strip_hop_by_hop(headers: Headers) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers nor the headers named in ``Connection``."""
    drop = HOP_BY_HOP
    if CONNECTION in headers:
        drop = drop | _connection_named(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k not in drop)


def upstream_request_headers(
    incoming: Headers, *, peer: str | None, scheme: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the upstream request: end-to-end ones plus forwarding headers."""
    out = strip_hop_by_hop(incoming)
    out.popall(EXPECT, None)  # the proxy answered any 100-continue itself
    if peer:
        prior = ", ".join(out.popall(X_FORWARDED_FOR, ()))
        out[X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
    # kept when an edge proxy in front already set them (it knows the original values)
    out.setdefault(X_FORWARDED_PROTO, scheme)
    host = out.get(HOST)
    if host:
        out.setdefault(X_FORWARDED_HOST, host)
    out[X_REQUEST_ID] = request_id
    return out


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None if absent or invalid."""
    if not traceparent:
        return None
    m = _TRACEPARENT.fullmatch(traceparent.strip())
    if not m or m.group(1) == _ZERO_TRACE or traceparent.startswith("ff"):
        return None
    return m.group(1)


_getrandbits = random.getrandbits
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> str:
    """A random (version 4) UUID string. Request ids need uniqueness, not secrecy, so
    the Mersenne Twister does, at a quarter of `uuid.uuid4()`'s cost."""
    h = f"{(_getrandbits(128) & _V4_CLEAR) | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
