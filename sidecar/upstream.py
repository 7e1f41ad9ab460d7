"""The upstream side: a keep-alive connection pool on aiohttp's own HTTP/1.1 machinery.

`ClientSession` is built for general clients (cookies, redirects, auth, proxies,
traces, default headers) and its per-request path is the largest single cost of a
reverse proxy. A proxy needs none of that, so this module drives aiohttp's protocol
pieces directly: `ResponseHandler` (its C response parser, body `StreamReader` with
flow control, disconnect handling) and `StreamWriter` (header serialization, chunked
framing, drain). Nothing here parses HTTP by hand.

Request heads arrive already serialised (`forwarding.request_head`: the client's header
bytes as received); the pool writes them to the transport and lets `StreamWriter` frame
the body. The aiohttp internals used here are exercised by tests/test_aiohttp_contract.py,
which names the one that changed when an aiohttp release breaks them.

Connections are reused LIFO while the upstream keeps them alive; one that died while
idle is discarded, and an idempotent request without a body that fails before any
response byte on a reused connection is retried once on a fresh one (RFC 9112 9.3.1).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import NamedTuple

from aiohttp import ClientConnectionError, ClientResponseError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from .forwarding import RawHeaders

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_READ_BUFSIZE = 2**16


class ConnectFailed(OSError):
    """No connection to the upstream could be made (refused, unreachable, DNS)."""


class UpstreamReset(ConnectionError):
    """The upstream closed or broke the connection before a complete response head."""


class UpstreamResponse(NamedTuple):
    """A response head that has arrived; the body is still to be read."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]  # for lookups (names canonicalised by the parser)
    raw_headers: RawHeaders  # for forwarding: bytes as received
    body: StreamReader
    connection: ResponseHandler


class UpstreamPool:
    """HTTP/1.1 keep-alive connections to one upstream origin."""

    def __init__(self, base_url: str, *, max_idle: int = 256) -> None:
        url = URL(base_url)
        self.host = url.host or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        # what a request without Host gets: the upstream's own authority
        self.authority = url.raw_authority.rpartition("@")[2] or self.host
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if url.scheme == "https" else None
        )
        self._max_idle = max_idle
        self._idle: list[ResponseHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self) -> ResponseHandler:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        try:
            _, proto = await loop.create_connection(
                lambda: ResponseHandler(loop),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl else None,
            )
        except OSError as exc:
            raise ConnectFailed(
                exc.errno, f"{self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return proto

    def _take_idle(self) -> ResponseHandler | None:
        idle = self._idle
        while idle:
            proto = idle.pop()
            if proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def release(self, proto: ResponseHandler) -> None:
        """Give back a connection whose response was read to the end."""
        if proto.is_connected() and not proto.should_close and len(self._idle) < self._max_idle:
            self._idle.append(proto)
        else:
            proto.close()

    async def request(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        content_length: bool,
    ) -> UpstreamResponse:
        """Send one request (``head``: its serialised head; ``content_length``: whether
        the head frames the body by Content-Length, else it is sent chunked) and return
        once the response head has arrived.

        The caller reads `body` and then calls `release(connection)`, or closes the
        connection on any failure or cancellation.
        """
        proto = self._take_idle()
        reused = proto is not None
        if proto is None:  # not `proto or ...`: an idle ResponseHandler has len() 0
            proto = await self._connect()
        try:
            return await self._send_and_read_head(proto, method, head, body, content_length)
        except UpstreamReset:
            if not (reused and body is None and method in _IDEMPOTENT):
                raise
        # the upstream had closed the idle connection we picked: once more, fresh
        proto = await self._connect()
        return await self._send_and_read_head(proto, method, head, body, content_length)

    async def _send_and_read_head(
        self,
        proto: ResponseHandler,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        content_length: bool,
    ) -> UpstreamResponse:
        """One request on one connection; the connection is closed if it fails."""
        loop = self._loop
        assert loop is not None
        proto.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,
            read_bufsize=_READ_BUFSIZE,
        )
        writer = StreamWriter(proto, loop)
        try:
            transport = proto.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("upstream connection closed")
            transport.write(head)
            if body is not None:
                if not content_length:
                    writer.enable_chunking()
                async for chunk in body:
                    await writer.write(chunk)
            await writer.write_eof()
            while True:
                message: RawResponseMessage
                message, payload = await proto.read()
                # interim responses (100 Continue, 103 Early Hints) are not forwarded
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except (ConnectionError, OSError, ClientConnectionError) as exc:
            # refused mid-way, reset, or closed before a response (ServerDisconnected)
            proto.close()
            raise UpstreamReset(str(exc) or type(exc).__name__) from None
        except (HttpProcessingError, ClientResponseError) as exc:  # not HTTP at all
            proto.close()
            raise UpstreamReset(f"invalid response: {str(exc)[:120]}") from None
        except BaseException:  # cancelled (timeout, client gone), or the errors above
            proto.close()
            raise
        return UpstreamResponse(
            message.code,
            message.reason,
            message.headers,
            message.raw_headers,
            payload,
            proto,
        )

    def close(self) -> None:
        for proto in self._idle:
            proto.close()
        self._idle.clear()
