"""Header rewriting between client and upstream (RFC 9110 section 7.6.1)."""

from __future__ import annotations

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
HOST = istr("Host")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "upgrade"})


def strip_in_place(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """Remove, in place, hop-by-hop headers and those named in ``Connection``.

    CIMultiDict lookups are case-insensitive and run in C: a copy plus a dozen
    membership tests is cheaper than a Python pass over every header.
    """
    named = [
        tok
        for value in headers.getall(CONNECTION, ())
        for tok in (t.strip().lower() for t in value.split(","))
        if tok and tok not in _PLAIN_CONNECTION
    ]
    for name in HOP_BY_HOP:
        if name in headers:
            del headers[name]
    for name in named:
        headers.popall(name, None)
    return headers


def end_to_end(headers: Headers) -> CIMultiDict[str]:
    """A copy with the end-to-end headers only, order and repeats kept."""
    return strip_in_place(CIMultiDict(headers))


def upstream_request_headers(
    incoming: Headers, *, peer: str | None, scheme: str, request_id: str
) -> CIMultiDict[str]:
    """Headers for the upstream request: end-to-end ones plus forwarding headers.

    `Expect` is dropped (the proxy answered any 100-continue itself); an existing
    `X-Forwarded-For` gets the peer appended; `X-Forwarded-Proto`/`-Host` are kept
    when an edge proxy in front already set them (it knows the original values).
    """
    out = end_to_end(incoming)
    if EXPECT in out:
        del out[EXPECT]
    prior = out.popall(X_FORWARDED_FOR, [])
    if peer:
        prior.append(peer)
    if prior:
        out[X_FORWARDED_FOR] = ", ".join(prior)
    if X_FORWARDED_PROTO not in out:
        out[X_FORWARDED_PROTO] = scheme
    if X_FORWARDED_HOST not in out:
        host = out.get(HOST)
        if host:
            out[X_FORWARDED_HOST] = host
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
