"""Header rewriting between client and upstream (RFC 9110 section 7.6.1)."""

from __future__ import annotations

import random
import re

from multidict import CIMultiDict, CIMultiDictProxy, istr

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# Hop-by-hop: meaningful for one connection only, never forwarded. RFC 9110 7.6.1 names
# Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and Upgrade; the
# RFC 2616 list adds Trailer and the Proxy-Authenticate/-Authorization pair.
# Names are compared lower-cased: header names are case-insensitive on the wire.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
X_REQUEST_ID = istr("X-Request-Id")
X_FORWARDED_FOR = istr("X-Forwarded-For")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
X_FORWARDED_HOST = istr("X-Forwarded-Host")
CONNECTION = istr("Connection")
EXPECT = istr("Expect")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "upgrade"})


def _dropped(headers: Headers) -> frozenset[str]:
    """Lower-cased hop-by-hop names plus any header named in ``Connection``."""
    values = headers.getall(CONNECTION, ())
    if not values:
        return HOP_BY_HOP
    named = {
        tok
        for value in values
        for tok in (t.strip().lower() for t in value.split(","))
        if tok and tok not in _PLAIN_CONNECTION
    }
    return HOP_BY_HOP | named if named else HOP_BY_HOP


def end_to_end(headers: Headers) -> list[tuple[str, str]]:
    """The end-to-end headers, in order, repeated ones kept (one pass, no copy)."""
    drop = _dropped(headers)
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


_REPLACED = frozenset({"expect", "x-forwarded-for", "x-request-id"})


def upstream_request_headers(
    incoming: Headers, *, peer: str | None, scheme: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the upstream request: end-to-end ones plus forwarding headers.

    `Expect` is dropped (the proxy answered any 100-continue itself); an existing
    `X-Forwarded-For` gets the peer appended; `X-Forwarded-Proto`/`-Host` are kept
    when an edge proxy in front already set them (it knows the original values).
    """
    drop = _dropped(incoming) | _REPLACED
    out: CIMultiDict[str] = CIMultiDict()
    prior: list[str] = []
    has_proto = has_host = False
    host = None
    for k, v in incoming.items():
        name = k.lower()
        if name in drop:
            if name == "x-forwarded-for":
                prior.append(v)
            continue
        if name == "x-forwarded-proto":
            has_proto = True
        elif name == "x-forwarded-host":
            has_host = True
        elif name == "host":
            host = v
        out.add(k, v)
    if peer:
        out.add(X_FORWARDED_FOR, ", ".join([*prior, peer]))
    elif prior:
        out.add(X_FORWARDED_FOR, ", ".join(prior))
    if not has_proto:
        out.add(X_FORWARDED_PROTO, scheme)
    if host and not has_host:
        out.add(X_FORWARDED_HOST, host)
    out.add(X_REQUEST_ID, request_id)
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
