"""Client connections, bounded: how many, how long to send a request head, how long
to sit idle, how long to leave a response unread.

aiohttp's server parses HTTP (llhttp) and closes idle keep-alive connections
(``keepalive_timeout``); it has no connection cap, no deadline for a request head
(a slowloris client holds a connection for ever) and no bound on a client that stops
reading. `GuardedServer` adds those around aiohttp's own `RequestHandler`:

- past ``max_connections`` a new connection is closed at once (its file descriptor is
  returned before anything else is read), so the admin listener and the upstream pool
  keep descriptors to work with;
- a connection must deliver a complete request head within ``header_timeout_s`` of
  opening, or of its first byte after an idle keep-alive pause: else `408` (when no
  request is in progress on it) and close;
- a connection whose response bytes sit unread in the kernel and the write buffer for
  ``idle_timeout_s`` is aborted (`sweep`, once a second, outside the request path);
- malformed requests get aiohttp's `400` (as the error JSON) without a traceback in the
  logs, counted instead.

The aiohttp internals used (`RequestHandler._request_count`, `_current_request`,
`_messages`, `Server._kwargs`, `Server._loop`) are checked by
tests/test_aiohttp_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .responses import error_response

log = logging.getLogger(__name__)
_perf = time.perf_counter
# the error JSON of every answer the sidecar writes itself (responses.error_response)
_TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "type": "client_timeout",
            "message": "no complete request head in time",
            "request_id": "",
        }
    }
).encode()
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    idle_timeout_s: float


Reject = Callable[[str], None]  # called with the reason: limit, header_timeout, ...


class _Refused(asyncio.Protocol):
    """Over the cap: close before reading anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler plus a request-head deadline.

    ``head_at`` is when the read that completed the latest request head happened
    (`time.perf_counter`): the earliest the process sees a request. The proxy's handler
    runs later, after whatever else the event loop had queued; it takes its start
    from here and clears it. (Pipelined heads read separately before the first one's
    handler starts: the first takes the latest read's time, the others their handler's
    start; later than the truth, never earlier.)"""

    __slots__ = ("_guard", "_head_timer", "_stall_mark", "_stall_since", "head_at")

    def __init__(self, guard: GuardedServer, **kwargs: Any) -> None:
        super().__init__(guard, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self._stall_since = 0.0
        self.head_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.open_count += 1
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.open_count -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._guard.limits.header_timeout_s, self._head_timeout
        )

    def data_received(self, data: bytes) -> None:
        now = _perf()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a complete head arrived
            self.head_at = now
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif self._head_timer is None and self._current_request is None and not self._messages:
            self._arm_head_timer()  # the first bytes of a new request after a pause

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._guard.reject("header_timeout")
        if self._current_request is None and not self._messages:
            transport.write(_REQUEST_TIMEOUT)
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or a handler bug): a short answer and
        a count; a traceback only at debug level, and only for our own bugs."""
        if status == 500 and isinstance(exc, ConnectionError):
            # the client went away while it was answered (a write to a closed socket)
            log.debug("client gone while answered: %s", type(exc).__name__)
        elif status == 500:
            log.error("unexpected error handling a request", exc_info=exc)
        else:
            self._guard.reject("bad_request")
            log.debug("bad request from %s: %s", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        kind = "internal" if status >= 500 else "bad_request"
        response = error_response(status, kind, f"{status} {phrase}".strip(), "")
        response.force_close()
        return response

    def sweep(self, now: float, idle_s: float) -> None:
        """Abort if response bytes have waited unread for ``idle_s``."""
        transport = self.transport
        if transport is None:
            return
        pending = transport.get_write_buffer_size()
        if not pending or pending != self._stall_mark:
            self._stall_mark = pending
            self._stall_since = now
        elif now - self._stall_since >= idle_s:
            self._guard.reject("stalled_reader")
            transport.abort()


class GuardedServer(web.Server):
    """`web.Server` with the limits above; `sweep()` once a second."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: Limits,
        reject: Reject,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self.limits = limits
        self.reject = reject
        self.open_count = 0

    @classmethod
    def like(cls, server: web.Server, limits: Limits, reject: Reject) -> GuardedServer:
        """A guarded copy of a server built by aiohttp (an application's)."""
        kwargs = {k: v for k, v in server._kwargs.items() if k != "keepalive_timeout"}
        return cls(
            server.request_handler,
            limits=limits,
            reject=reject,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **kwargs,
        )

    def __call__(self) -> RequestHandler:
        if self.open_count >= self.limits.max_connections:
            self.reject("connection_limit")
            return _Refused()  # type: ignore[return-value]
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def sweep(self) -> None:
        now = self._loop.time()
        idle = self.limits.idle_timeout_s
        for handler in list(self._connections):
            if isinstance(handler, GuardedHandler):
                handler.sweep(now, idle)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` serving through a `GuardedServer`."""

    def __init__(self, app: web.Application, limits: Limits, reject: Reject) -> None:
        super().__init__(app, access_log=None)
        self._limits = limits
        self._reject = reject

    async def _make_server(self) -> web.Server:
        return GuardedServer.like(await super()._make_server(), self._limits, self._reject)

    @property
    def guarded(self) -> GuardedServer:
        server = self.server
        assert isinstance(server, GuardedServer)
        return server
