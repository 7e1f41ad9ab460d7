"""Protocol upgrades (WebSocket): after the upstream's ``101``, a byte tunnel both ways.

The proxy forwards the handshake like any request (`forwarding.upgrade_head` puts
``Upgrade`` and ``Connection: Upgrade`` back); when the upstream answers ``101`` it hands
the exchange to `Tunnels.open`, which relays the ``101`` head to the client and takes
both sockets over: each transport gets a `_Side` as its protocol
(``transport.set_protocol``), and from then on bytes are copied as they arrive, never
decoded (permessage-deflate and every other extension pass through).

- Backpressure, both ways: when one side's write buffer passes 64 KiB
  (``pause_writing``), reading from the other side stops until it drains below 16 KiB
  (``resume_writing``). A reader that stops reading holds at most that buffer and one
  socket read in the sidecar; the writer behind it waits in its own kernel buffers.
- Half-close: an end of stream from one side (FIN) is passed on (``write_eof``) while the
  other direction keeps flowing; once both have ended, both sockets close. A socket
  that closes takes the other one with it (a reset as a reset); what is still buffered
  for the other side gets `LINGER_S` to be delivered, then that socket is aborted.
- The ``close`` label of a WebSocket session names the side whose Close frame (opcode
  0x8) came first. To see it, `FrameScanner` reads each direction's frame headers
  (opcode, mask bit, payload length; RFC 6455 section 5.2) and skips the payloads
  unread: which side drops TCP first is a race and decides nothing. ``shutdown``: the
  sidecar ended it (`Tunnels.close_all`, at the end of the shutdown grace period);
  ``error``: the connection ended without a Close frame. A non-WebSocket upgrade has
  no frames: its label is the side that ended its stream (FIN) first, else ``error``.
- Limits: the client connection stays a connection of the guarded server until it
  closes (it counts against ``SIDECAR_MAX_CONNECTIONS``), and the stalled-reader rule
  applies to it on purpose: tunnel bytes left unread by the client for
  ``SIDECAR_CLIENT_IDLE_TIMEOUT_S`` abort it (``close="error"``). An idle session (no
  bytes either way) is never timed out here: that is the upstream's business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Final, Protocol

from aiohttp import hdrs, web
from aiohttp.client_proto import ResponseHandler
from aiohttp.web_protocol import RequestHandler

from .forwarding import X_REQUEST_ID, end_to_end, head_bytes
from .upstream import UpstreamResponse

log = logging.getLogger(__name__)

HIGH_WATER: Final = 64 * 1024  # a side's write buffer above this pauses the other side
LOW_WATER: Final = 16 * 1024
LINGER_S: Final = 10.0  # a side whose peer closed gets this long to take its last bytes
SHUTDOWN_LINGER_S: Final = 1.0
CLIENT, UPSTREAM, SHUTDOWN, ERROR = "client", "upstream", "shutdown", "error"
_CLOSE_OPCODE: Final = 0x8
_GOING_AWAY: Final = b"\x03\xe9"  # close code 1001: the endpoint is going away
_perf = time.perf_counter

Count = Callable[[int], None]


class SessionObserver(Protocol):
    """What the metrics learn about sessions; called on the event loop, O(1)."""

    def handshake(self, route: str, seconds: float) -> None:
        """A ``101`` was relayed, ``seconds`` after the request arrived."""

    def counters(self, route: str) -> tuple[Count, Count]:
        """Byte counters of ``route``: (client to upstream, upstream to client)."""
        ...

    def session_end(self, route: str, close: str, seconds: float) -> None:
        """A session of ``seconds`` (from its ``101``) ended; ``close``: who ended it."""


class _Unobserved:
    def handshake(self, route: str, seconds: float) -> None:
        pass

    def counters(self, route: str) -> tuple[Count, Count]:
        return _ignore, _ignore

    def session_end(self, route: str, close: str, seconds: float) -> None:
        pass


def _ignore(n: int) -> None:
    pass


class FrameScanner:
    """Spots the first Close frame in one direction of a WebSocket byte stream.

    Reads only frame headers: the opcode, the mask bit and the payload length; payloads
    (masked or not, compressed or not) are skipped unread. Bytes that are not WebSocket
    frames are skipped the same way and never raise; what is kept between chunks is at
    most one incomplete frame header (< 14 bytes)."""

    __slots__ = ("_head", "_skip", "closed")

    def __init__(self) -> None:
        self._skip = 0  # payload bytes still to pass over
        self._head = b""  # an incomplete frame header from the previous chunk
        self.closed = False

    @property
    def at_boundary(self) -> bool:
        """Everything seen so far ends with a complete frame."""
        return not self._skip and not self._head

    def feed(self, data: bytes) -> bool:
        """Scan ``data``; True once a Close frame has been seen (then stop feeding)."""
        n = len(data)
        skip = self._skip
        if skip >= n:
            self._skip = skip - n
            return False
        pos = skip
        self._skip = 0
        if self._head:
            data = self._head + data[pos:]
            n = len(data)
            pos = 0
            self._head = b""
        while pos < n:
            if n - pos < 2:
                self._head = data[pos:]
                return False
            opcode_byte = data[pos]
            length_byte = data[pos + 1]
            length = length_byte & 0x7F
            header = 2 if length < 126 else 4 if length == 126 else 10
            if length_byte & 0x80:
                header += 4  # masking key
            if n - pos < header:
                self._head = data[pos:]
                return False
            if opcode_byte & 0x0F == _CLOSE_OPCODE:
                self.closed = True
                return True
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            pos += header + length
        self._skip = pos - n
        return False


class _Side(asyncio.Protocol):
    """The protocol of one socket of a tunnel: what it sends goes to its peer."""

    def __init__(
        self,
        session: _Session,
        name: str,
        transport: asyncio.Transport,
        count: Count,
        scanner: FrameScanner | None,
    ) -> None:
        self.session = session
        self.name = name
        self.transport = transport
        self.peer: _Side = self
        self.count = count
        self.scanner = scanner  # of the bytes this side sends
        self.ended = False  # this side sent its end of stream
        self.lost = False

    def data_received(self, data: bytes) -> None:
        scanner = self.scanner
        if scanner is not None and scanner.feed(data):
            self.scanner = None
            self.session.close_frame(self.name)
        self.count(len(data))
        peer = self.peer
        if not (peer.lost or self.ended):
            peer.transport.write(data)

    def eof_received(self) -> bool:
        if not self.ended:
            self.ended = True
            self.session.ended(self)
        return True  # keep the socket open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.session.lost(self, exc)

    # this side's write buffer is full / drained again: hold / release the other side
    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    def pause_reading(self) -> None:
        if not (self.ended or self.lost or self.transport.is_closing()):
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not (self.ended or self.lost or self.transport.is_closing()):
            self.transport.resume_reading()


class _Session:
    """One tunnel: two `_Side` s, the ``close`` label, the end of the exchange."""

    def __init__(
        self,
        tunnels: Tunnels,
        route: str,
        handler: RequestHandler,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        websocket: bool,
    ) -> None:
        self._tunnels = tunnels
        self.route = route
        self._handler = handler
        count_in, count_out = tunnels.observer.counters(route)
        self.client = _Side(self, CLIENT, client, count_in, FrameScanner() if websocket else None)
        self.upstream = _Side(
            self, UPSTREAM, upstream, count_out, FrameScanner() if websocket else None
        )
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.websocket = websocket
        self.first: str | None = None  # the side whose Close frame (or FIN) came first
        self.shutting_down = False
        self.started = _perf()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._linger: asyncio.TimerHandle | None = None

    def close_frame(self, side: str) -> None:
        if self.first is None and not self.shutting_down:
            self.first = side

    def ended(self, side: _Side) -> None:
        if not self.websocket:
            self.close_frame(side.name)
        peer = side.peer
        if peer.lost:
            return
        if peer.ended:  # both directions are over
            self._close_both()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()  # after what is still buffered for it
        else:  # TLS cannot half-close
            self._close(peer.transport, LINGER_S)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.client:
            # the connection's own handler learns it now: the guarded server's count
            # and connection list, aiohttp's clean-up
            self._handler.connection_lost(exc)
        peer = side.peer
        if not peer.lost:
            if exc is None:
                self._close(peer.transport, LINGER_S)
            else:  # a reset is passed on as a reset
                peer.transport.abort()
            return
        self._finish()

    def _close(self, transport: asyncio.Transport, linger: float) -> None:
        transport.close()  # sends what is buffered, then closes
        if self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(linger, self.abort)

    def _close_both(self) -> None:
        self._close(self.client.transport, LINGER_S)
        self._close(self.upstream.transport, LINGER_S)

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.abort()

    def shutdown(self) -> None:
        """Close both sides: a WebSocket Close frame (1001, going away) to each side
        whose stream is between frames and has not had one yet, then the sockets."""
        self.shutting_down = True
        for side in (self.client, self.upstream):
            if side.lost:
                continue
            toward = side.peer.scanner  # the bytes sent toward `side` so far
            if toward is not None and toward.at_boundary and not side.peer.ended:
                side.transport.write(_close_frame(masked=side is self.upstream))
            side.transport.close()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._linger = asyncio.get_running_loop().call_later(SHUTDOWN_LINGER_S, self.abort)

    def _finish(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        close = self.first or (SHUTDOWN if self.shutting_down else ERROR)
        self._tunnels.closed(self, close, _perf() - self.started)
        if not self.done.done():
            self.done.set_result(None)


def _close_frame(*, masked: bool) -> bytes:
    """A Close frame with code 1001; masked as a client's frame must be (to the upstream)."""
    if not masked:
        return b"\x88\x02" + _GOING_AWAY
    key = os.urandom(4)
    return b"\x88\x82" + key + bytes(b ^ key[i] for i, b in enumerate(_GOING_AWAY))


class _TunnelResponse(web.StreamResponse):
    """What the handler returns for a tunnel: the ``101`` is already written, so
    aiohttp's ``prepare`` writes nothing, and its ``write_eof`` lasts as long as the
    session (aiohttp closes the connection when it returns)."""

    def __init__(self, done: asyncio.Future[None] | None) -> None:
        super().__init__(status=101)
        self.force_close()
        self._done = done

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        if self._done is not None:
            await self._done


class _Buffered:
    """Takes the bytes aiohttp read past a head before the tunnel took the socket
    over: a parser in the sense of aiohttp's ``set_parser``, as its WebSocket reader is."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Tunnels:
    """The open sessions: counted for the gauge, waited on and closed at shutdown."""

    def __init__(self, observer: SessionObserver | None = None) -> None:
        self.observer: SessionObserver = _Unobserved() if observer is None else observer
        self._sessions: set[_Session] = set()
        self._empty: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def handshake(self, route: str, seconds: float) -> None:
        self.observer.handshake(route, seconds)

    def open(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        route: str,
        offered: bytes,
        request_id: str,
    ) -> web.StreamResponse:
        """Relay the upstream's ``101`` and tunnel both sockets from here on.
        ``offered``: the client's ``Upgrade`` value."""
        handler = request.protocol
        client = request.transport
        proto: ResponseHandler = upstream.connection
        up = proto.transport
        if not isinstance(handler, RequestHandler) or client is None or client.is_closing():
            proto.close()  # the client left while the upstream answered
            return _TunnelResponse(None)
        if up is None or up.is_closing():
            client.close()
            return _TunnelResponse(None)
        raw = end_to_end(upstream.raw_headers)
        protocol = upstream.headers.get(hdrs.UPGRADE)
        if protocol is not None:
            offered = protocol.encode("utf-8", "surrogateescape")
        raw.append((b"Connection", b"Upgrade"))
        raw.append((b"Upgrade", offered))
        if X_REQUEST_ID not in upstream.headers:
            raw.append((b"X-Request-Id", request_id.encode("utf-8", "surrogateescape")))
        client.write(
            head_bytes(b"HTTP/1.1 101 " + upstream.reason.encode("latin-1", "replace"), raw)
        )
        # bytes aiohttp read past either head stay in its protocols: take them out
        from_client, from_upstream = _Buffered(), _Buffered()
        handler.set_parser(from_client)  # type: ignore[arg-type]
        proto.set_parser(from_upstream, None)
        websocket = offered.strip().lower() == b"websocket"
        session = _Session(self, route, handler, client, up, websocket)
        self._sessions.add(session)
        for side in (session.client, session.upstream):
            side.transport.set_protocol(side)
            side.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if from_upstream.data:
            session.upstream.data_received(bytes(from_upstream.data))
        if from_client.data:
            session.client.data_received(bytes(from_client.data))
        client.resume_reading()  # aiohttp may have paused either while it buffered
        up.resume_reading()
        return _TunnelResponse(session.done)

    def closed(self, session: _Session, close: str, seconds: float) -> None:
        self._sessions.discard(session)
        self.observer.session_end(session.route, close, seconds)
        if self._empty is not None and not self._sessions:
            self._empty.set()

    async def wait_closed(self) -> None:
        """Return once no session is open."""
        while self._sessions:
            self._empty = asyncio.Event()
            await self._empty.wait()

    async def close_all(self) -> None:
        """Shutdown: close every session (``close="shutdown"``); what is still buffered
        gets `SHUTDOWN_LINGER_S` to go out, then the sockets are aborted."""
        if not self._sessions:
            return
        log.info("closing websocket sessions", extra={"sessions": len(self._sessions)})
        for session in list(self._sessions):
            session.shutdown()
        try:
            async with asyncio.timeout(SHUTDOWN_LINGER_S + 1):
                await self.wait_closed()
        except TimeoutError:
            for session in list(self._sessions):
                session.abort()
