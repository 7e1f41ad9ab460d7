"""The proxy core: forward one request to the upstream, stream both ways, time it.

The handler knows nothing of percentiles, metrics or events: it builds one immutable
`TimingRecord` per request and hands it to its observers, synchronously and in O(1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
from aiohttp import hdrs, web

from .config import Settings
from .forwarding import (
    EXPECT,
    X_REQUEST_ID,
    strip_in_place,
    trace_id_of,
    upstream_request_headers,
)
from .ids import new_id
from .record import CLIENT_DISCONNECT, Observer, TimingRecord, latency_of
from .routes import RouteLabeler
from .upstream import ConnectFailed, UpstreamPool, UpstreamReset

log = logging.getLogger(__name__)

_CHUNK: Final = 64 * 1024
_EVENT_STREAM: Final = "text/event-stream"
_perf = time.perf_counter
_wall = time.time


class _BufferedResponse(web.StreamResponse):
    """Headers go out with the first body chunk: one write for small responses."""

    _send_headers_immediately = False


class UpstreamError(Exception):
    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


def _error_response(status: int, kind: str, message: str, request_id: str) -> web.Response:
    return web.json_response(
        {"error": {"type": f"upstream_{kind}", "message": message, "request_id": request_id}},
        status=status,
        headers={X_REQUEST_ID: request_id},
    )


class Proxy:
    """Forwards every request to ``settings.upstream_url``.

    `in_flight` and `draining` are read by the admin listener and the server's
    shutdown sequence.
    """

    def __init__(
        self, settings: Settings, labeler: RouteLabeler, observers: Sequence[Observer] = ()
    ) -> None:
        self._base = settings.upstream_url
        self._timeout = settings.upstream_timeout_s
        self._labeler = labeler
        self._observers: tuple[Observer, ...] = tuple(observers)
        self._pool: UpstreamPool | None = None
        self.in_flight = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    def add_observer(self, observer: Observer) -> None:
        self._observers = (*self._observers, observer)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = UpstreamPool(self._base)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def _emit(self, record: TimingRecord) -> None:
        for observer in self._observers:
            try:
                observer.observe(record)
            except Exception:  # an observer bug must never break proxied traffic
                log.exception("observer %r failed", observer)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = _perf()
        wall = _wall()
        self.in_flight += 1
        headers = request.headers
        request_id = headers.get(X_REQUEST_ID) or new_id()
        route = self._labeler.label(request.path)
        state = _Exchange()
        try:
            response = await self._forward(request, request_id, state)
            return response
        except UpstreamError as exc:
            state.error = exc.kind
            state.status = exc.status
            response = _error_response(exc.status, exc.kind, str(exc), request_id)
            if self.draining:
                response.force_close()
            return response
        except asyncio.CancelledError:  # client disconnected before the response began
            state.error = CLIENT_DISCONNECT
            state.status = 499
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and not self.in_flight:
                self._idle.set()
            end = _perf()
            first_byte_at = state.first_byte_at
            stream = state.stream
            self._emit(
                TimingRecord(
                    start,
                    state.sent_at,
                    state.headers_at,
                    state.upstream_end,
                    first_byte_at,
                    end,
                    wall,
                    request.method,
                    route,
                    state.status,
                    state.bytes_in,
                    state.bytes_out,
                    stream,
                    request_id,
                    trace_id_of(headers.get("traceparent")),
                    state.error,
                    latency_of(start, first_byte_at, end, stream),
                )
            )

    async def _forward(
        self, request: web.BaseRequest, request_id: str, state: _Exchange
    ) -> web.StreamResponse:
        pool = self._pool
        assert pool is not None, "Proxy.start() not awaited"
        if "Upgrade" in request.headers:
            state.status = 501
            return web.json_response(
                {
                    "error": {
                        "type": "not_implemented",
                        "message": "protocol upgrade (WebSocket, h2c) is not proxied",
                    }
                },
                status=501,
                headers={X_REQUEST_ID: request_id},
            )
        if request.headers.get(EXPECT, "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        out_headers = upstream_request_headers(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            request_id=request_id,
        )
        body = _body_iter(request, state) if request.body_exists else None
        state.sent_at = _perf()
        # A bare timer rather than asyncio.timeout(): same semantics (cancel the task,
        # tell our cancellation from a client disconnect by uncancel()), a few µs less.
        task = asyncio.current_task()
        assert task is not None
        timer = self._loop.call_later(self._timeout, _expire, task, state)
        try:
            upstream = await pool.request(request.method, request.raw_path, out_headers, body)
        except asyncio.CancelledError:
            if state.timed_out and task.uncancel() == 0:
                raise UpstreamError(
                    "timeout", 504, f"no response headers from upstream within {self._timeout:g}s"
                ) from None
            raise
        except ConnectFailed as exc:
            raise UpstreamError("connect", 502, f"upstream unreachable: {exc}") from None
        except UpstreamReset as exc:
            raise UpstreamError(
                "reset", 502, f"upstream reset the connection: {str(exc)[:120]}"
            ) from None
        finally:
            timer.cancel()

        connection = upstream.connection
        state.headers_at = _perf()
        state.status = upstream.status
        stream = upstream.headers.get(hdrs.CONTENT_TYPE, "").startswith(_EVENT_STREAM)
        state.stream = stream
        response = (web.StreamResponse if stream else _BufferedResponse)(
            status=upstream.status, reason=upstream.reason
        )
        resp_headers = response.headers
        resp_headers.extend(upstream.headers)  # one C-level copy, then filtered
        strip_in_place(resp_headers)
        if X_REQUEST_ID not in resp_headers:
            resp_headers[X_REQUEST_ID] = request_id
        if self.draining:
            response.force_close()
        try:
            await response.prepare(request)
            async for chunk in upstream.body.iter_any():
                if state.first_byte_at is None:
                    state.first_byte_at = _perf()
                state.bytes_out += len(chunk)
                await response.write(chunk)
            state.upstream_end = _perf()
        except ConnectionResetError:
            # the client went away mid-response; aiohttp finishes quietly with this
            state.error = CLIENT_DISCONNECT
            state.status = 499
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # Headers are gone already: the only honest signal left is to cut the
            # client connection so it sees a truncated response.
            state.error = "reset"
            log.debug("upstream broke mid-body: %s", exc)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            if state.upstream_end is None:  # body not read to the end: never reuse it
                connection.close()
        pool.release(connection)
        await response.write_eof()
        return response


class _Exchange:
    """Mutable scratch state of one exchange; frozen into a TimingRecord at the end."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "error",
        "first_byte_at",
        "headers_at",
        "sent_at",
        "status",
        "stream",
        "timed_out",
        "upstream_end",
    )

    def __init__(self) -> None:
        self.sent_at: float | None = None
        self.upstream_end: float | None = None
        self.headers_at: float | None = None
        self.first_byte_at: float | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.stream = False
        self.timed_out = False
        self.error: str | None = None


def _expire(task: asyncio.Task[object], state: _Exchange) -> None:
    state.timed_out = True
    task.cancel()


async def _body_iter(request: web.BaseRequest, state: _Exchange) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(_CHUNK):
        state.bytes_in += len(chunk)
        yield chunk
