"""The proxy core: forward one request to the upstream, stream both ways, time it.

The handler knows nothing of percentiles, metrics or events: it builds one immutable
`TimingRecord` per request and hands it to its observers, synchronously and in O(1).

Time limits of one request (README "Limits and hostile input"):
- ``upstream_timeout_s`` from the end of the request body to the upstream's response
  head (504). A body that is already complete when the handler starts, the usual case,
  needs one timer for the whole exchange;
- a streaming upload is watched by the same timer, re-armed lazily: while body bytes
  move it keeps waiting; ``client_idle_timeout_s`` without progress ends it, as the
  client's fault (408) when the proxy waits on the client, else the upstream's (504).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter

from .anatomy.sse import SseScanner
from .anatomy.usage import TAIL as USAGE_TAIL
from .anatomy.usage import usage_of
from .forwarding import (
    EXPECT,
    X_REQUEST_ID,
    BadRequest,
    end_to_end,
    head_bytes,
    request_head,
    trace_id_of,
    upgrade_head,
)
from .ids import new_id
from .record import (
    CLIENT_DISCONNECT,
    CLIENT_TIMEOUT,
    NO_ANATOMY,
    AnatomyFields,
    Observer,
    TimingRecord,
    latency_of,
)
from .responses import error_response
from .routes import RouteLabeler
from .tunnel import Tunnels
from .upstream import ConnectFailed, UpstreamPool, UpstreamReset

_make_record = TimingRecord._make
_ANATOMY_AT = TimingRecord._fields.index("first_token_at")  # the anatomy fields start here

if TYPE_CHECKING:
    from .connections import GuardedHandler

log = logging.getLogger(__name__)

_EVENT_STREAM: Final = "text/event-stream"
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]*)(.*)", re.S)
_perf = time.perf_counter
_wall = time.time


class _ProxyResponse(web.StreamResponse):
    """Sends the upstream's head as it came: its end-to-end header bytes, plus only the
    framing decided for this client (Content-Length kept, else chunked for HTTP/1.1 or
    close-delimited for HTTP/1.0), ``Connection`` when it differs from the version's
    default, and the X-Request-Id when the upstream sent none. aiohttp's own header
    preparation (Date, Server, Content-Type defaults) is bypassed: nothing is added
    that the upstream did not send."""

    def __init__(
        self, status: int, reason: str, raw: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        super().__init__(status=status, reason=reason)
        self._raw = raw
        self._length = length

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        lines = self._raw
        version = request.version
        if self._must_be_empty_body:
            pass  # HEAD, 1xx, 204, 304: the upstream's headers say all there is
        elif self._length is not None:
            writer.length = self._length
        elif version >= HttpVersion11:
            writer.enable_chunking()
            lines.append((b"Transfer-Encoding", b"chunked"))
        else:  # HTTP/1.0 client, length unknown: the end of the body is the close
            keep_alive = False
        self._keep_alive = keep_alive
        if not keep_alive:
            if version >= HttpVersion11:
                lines.append((b"Connection", b"close"))
        elif version == HttpVersion10:
            lines.append((b"Connection", b"keep-alive"))

    async def _write_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and isinstance(writer, StreamWriter)
        version = request.version
        writer._headers_buf = head_bytes(  # what StreamWriter.write_headers stores
            b"HTTP/%d.%d %d %s"
            % (version[0], version[1], self._status, self._reason.encode("latin-1")),
            self._raw,
        )
        writer._headers_written = False
        if self._send_headers_immediately:
            writer.send_headers()


class _BufferedResponse(_ProxyResponse):
    """Headers go out with the first body chunk: one write for small responses."""

    _send_headers_immediately = False


class UpstreamError(Exception):
    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class Proxy:
    """Forwards every request to ``upstream_url``.

    `in_flight` and `draining` are read by the admin listener and the shutdown sequence.
    """

    def __init__(
        self,
        upstream_url: str,
        labeler: RouteLabeler,
        observers: Sequence[Observer] = (),
        *,
        content_observers: Sequence[Observer] = (),
        upstream_timeout_s: float,
        client_idle_timeout_s: float = 60.0,
        tunnels: Tunnels | None = None,
    ) -> None:
        self._pool = UpstreamPool(upstream_url)
        self._default_host = self._pool.authority.encode("ascii")
        self._timeout = upstream_timeout_s
        self._idle_timeout = client_idle_timeout_s
        self._labeler = labeler
        self._observers: tuple[Observer, ...] = tuple(observers)
        # also told of answers whose content said something (streams, reported usage),
        # after `observers`: most unary answers never reach them
        self._content_observers: tuple[Observer, ...] = tuple(content_observers)
        self.in_flight = 0
        self.tunnels = Tunnels() if tunnels is None else tunnels  # upgraded: sessions
        self.draining = False
        self._idle: asyncio.Event | None = None

    def add_observer(self, observer: Observer, *, content: bool = False) -> None:
        """One more observer of every record (``content``: of the records of answers
        whose content said something, as ``content_observers``)."""
        if content:
            self._content_observers = (*self._content_observers, observer)
        else:
            self._observers = (*self._observers, observer)

    async def __aenter__(self) -> Proxy:
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *_: object) -> None:
        self._pool.close()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def _emit(self, record: TimingRecord, observers: tuple[Observer, ...]) -> None:
        for observer in observers:
            try:
                observer.observe(record)
            except Exception:  # an observer bug must never break proxied traffic
                log.exception("observer %r failed", observer)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # When the head was read (connections.GuardedHandler.head_at; `_protocol`: no
        # property call): under load the handler starts later, and that wait is the
        # sidecar's own time too. Each read time starts one request: the next head on
        # the connection sets its own; one parsed elsewhere (after a declined upgrade)
        # starts now.
        protocol: GuardedHandler = request._protocol  # type: ignore[assignment]
        start = protocol.head_at
        if start is None:
            start = _perf()
        else:
            protocol.head_at = None
        wall = _wall()
        self.in_flight += 1
        headers = request.headers
        client_id = headers.get(X_REQUEST_ID)
        request_id = client_id or new_id()
        route = self._labeler.label(request.path)
        state = _RequestState()
        try:
            return await self._forward(request, request_id, client_id is None, state)
        except UpstreamError as exc:
            state.error = exc.kind if exc.status != 408 else CLIENT_TIMEOUT
            state.status = exc.status
            kind = "client_timeout" if exc.status == 408 else f"upstream_{exc.kind}"
            response = error_response(exc.status, kind, str(exc), request_id)
            if self.draining or exc.status == 408:
                response.force_close()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            # the client disconnected before the response began, or a write to it failed
            # (connections.GuardedHandler logs that at debug level)
            state.error = CLIENT_DISCONNECT
            state.status = 499
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and not self.in_flight:
                self._idle.set()
            end = _perf()
            if state.status == 101:  # a tunnel now: a session, kept out of request stats
                self.tunnels.handshake(route, end - start)
            else:
                first_byte_at = state.first_byte_at
                stream = state.stream
                # positional, in field order: keyword construction of a NamedTuple costs
                # ~1 µs more per request (measured); tests/test_proxy.py checks the fields.
                # The anatomy fields keep their default (None) here: most answers have
                # none, and passing them costs every request (0.3k instructions)
                record = TimingRecord(
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
                anatomy = state.anatomy
                if anatomy is not NO_ANATOMY:  # the answer's content spoke
                    record = _make_record(record[:_ANATOMY_AT] + anatomy)
                    self._emit(record, self._observers)
                    self._emit(record, self._content_observers)
                else:
                    self._emit(record, self._observers)
                    if stream:  # a stream is a content observer's even when it said nothing
                        self._emit(record, self._content_observers)

    def _refuse(
        self, state: _RequestState, status: int, kind: str, message: str, request_id: str
    ) -> web.Response:
        """The sidecar's own answer to a request it will not forward: the JSON error,
        with the request's id (kept or assigned) as for any answer."""
        state.status = status
        state.error = kind
        response = error_response(status, kind, message, request_id)
        response.force_close()
        return response

    async def _forward(
        self, request: web.BaseRequest, request_id: str, add_id: bool, state: _RequestState
    ) -> web.StreamResponse:
        method = request.method
        if request.version != HttpVersion11:
            refused = self._check_old_version(request, state, request_id)
            if refused is not None:
                return refused
        if method == "CONNECT":
            refused = self._refuse(
                state, 405, "method_not_allowed", "CONNECT is not proxied", request_id
            )
            refused.headers[hdrs.ALLOW] = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
            return refused
        raw_target = request.raw_path
        host: bytes | None = None
        if raw_target.startswith("/"):
            target = raw_target.encode("utf-8", "surrogateescape")
        elif raw_target == "*" and method == "OPTIONS":
            target = b"*"
        elif m := _ABSOLUTE_FORM.fullmatch(raw_target):
            # RFC 9112 3.2.2: the target's authority replaces Host; the upstream gets
            # the origin form, never an absolute URL it might fetch
            host = m.group(1).encode("utf-8", "surrogateescape")
            rest = m.group(2)
            target = (rest if rest.startswith("/") else "/" + rest).encode(
                "utf-8", "surrogateescape"
            )
        else:
            return self._refuse(state, 400, "bad_request", "unsupported request target", request_id)
        upgrade = request.headers.get(hdrs.UPGRADE)
        if upgrade is not None and (
            upgrade.strip().lower() == "h2c" or request.version != HttpVersion11
        ):
            # ignored: h2c offers (RFC 9113 3.1), any in HTTP/1.0 (RFC 9110 7.8);
            # Upgrade is hop-by-hop, dropped below
            upgrade = None
        body_exists = request.body_exists
        if body_exists and request.headers.get(EXPECT, "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            head = request_head(
                method,
                target,
                request.raw_headers,
                peer=request.remote,
                scheme=request.scheme,
                request_id=request_id if add_id else None,
                host=host,
                default_host=self._default_host,
                chunked=body_exists and hdrs.CONTENT_LENGTH not in request.headers,
                http11=request.version == HttpVersion11,
            )
        except BadRequest as exc:
            return self._refuse(state, exc.status, "bad_request", str(exc), request_id)
        if upgrade is not None:  # WebSocket: a 101 turns the exchange into a tunnel
            head = upgrade_head(head, upgrade.encode("utf-8", "surrogateescape"))
        task = asyncio.current_task()
        assert task is not None
        body: AsyncIterator[bytes] | None = None
        if body_exists:
            body = self._body(request, state, task)
        state.sent_at = _perf()
        # A bare timer rather than asyncio.timeout(): same semantics (cancel the task,
        # tell our cancellation from a client disconnect by uncancel()), a few µs less.
        state.timer = self._loop.call_later(self._timeout, self._expire, task, state)
        try:
            upstream = await self._pool.request(
                method, head, body, hdrs.CONTENT_LENGTH in request.headers
            )
        except asyncio.CancelledError:
            if state.timed_out and task.uncancel() == 0:
                if state.timed_out == CLIENT_TIMEOUT:
                    raise UpstreamError(
                        "client", 408, f"request body stalled for {self._idle_timeout:g}s"
                    ) from None
                raise UpstreamError(
                    "timeout", 504, f"no response from upstream within {self._timeout:g}s"
                ) from None
            raise
        except ConnectFailed:
            raise UpstreamError("connect", 502, "upstream unreachable") from None
        except UpstreamReset:
            raise UpstreamError(
                "reset", 502, "upstream closed the connection or sent an invalid response"
            ) from None
        finally:
            state.timer.cancel()

        connection = upstream.connection
        state.headers_at = _perf()
        state.status = upstream.status
        if upstream.status == 101:
            if upgrade is None:  # RFC 9110 15.2.2: only to a protocol the client offered
                connection.close()
                raise UpstreamError("reset", 502, "upstream switched protocols unasked")
            return self.tunnels.open(
                request,
                upstream,
                self._labeler.label(request.path),
                upgrade.encode("utf-8", "surrogateescape"),
                request_id,
            )
        stream = upstream.headers.get(hdrs.CONTENT_TYPE, "").startswith(_EVENT_STREAM)
        state.stream = stream
        raw = end_to_end(upstream.raw_headers)
        if X_REQUEST_ID not in upstream.headers:
            raw.append((b"X-Request-Id", request_id.encode("utf-8", "surrogateescape")))
        length = upstream.headers.get(hdrs.CONTENT_LENGTH)
        response: _ProxyResponse = (_ProxyResponse if stream else _BufferedResponse)(
            upstream.status,
            upstream.reason,
            raw,
            None if length is None else int(length),  # the parser checked it is a number
        )
        if self.draining:
            response.force_close()
        try:
            await response.prepare(request)
            if stream:
                await self._relay_stream(upstream.body, response, state)
            else:
                # the last two chunks, by reference: the tail that holds a JSON `usage`
                before = last = b""
                async for chunk in upstream.body.iter_any():
                    if state.first_byte_at is None:
                        state.first_byte_at = _perf()
                    state.bytes_out += len(chunk)
                    await response.write(chunk)
                    before, last = last, chunk
                # One chunk of at most TAIL bytes without "usage": nothing to read.
                # rpartition searches from the end, where LLM APIs put usage (an
                # embeddings answer: its last bytes), and costs 0.5k instructions less
                # than find (argument parsing); `in` on bytes raises a TypeError first.
                if before or len(last) > USAGE_TAIL or last.rpartition(b'"usage"')[1]:
                    usage = usage_of(before, last)
                    if usage is not None:
                        state.anatomy = (None, None, *usage)
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
            log.debug("upstream broke mid-body: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            if state.upstream_end is None:  # body not read to the end: never reuse it
                connection.close()
        self._pool.release(connection)
        try:
            await response.write_eof()
        except ConnectionResetError:  # the client went away before the body's end
            state.error = CLIENT_DISCONNECT
            state.status = 499
        return response

    async def _relay_stream(
        self, body: aiohttp.StreamReader, response: _ProxyResponse, state: _RequestState
    ) -> None:
        """A text/event-stream body, chunk by chunk as it arrives, scanned for its
        first token, output chunks and usage (anatomy/sse.py)."""
        scanner = SseScanner()
        feed = scanner.feed
        try:
            async for chunk in body.iter_any():
                now = _perf()
                if state.first_byte_at is None:
                    state.first_byte_at = now
                try:
                    feed(chunk, now)
                except Exception:  # a scanner bug must never break proxied traffic
                    log.exception("SSE scanner failed")
                    feed = _ignore
                state.bytes_out += len(chunk)
                await response.write(chunk)
        finally:  # however the stream ended
            try:
                state.anatomy = scanner.result(state.first_byte_at)
            except Exception:
                log.exception("SSE scanner failed")

    def _check_old_version(
        self, request: web.BaseRequest, state: _RequestState, request_id: str
    ) -> web.Response | None:
        if request.version < HttpVersion10:  # HTTP/0.9: no headers to forward or answer with
            return self._refuse(state, 400, "bad_request", "HTTP/1.0 or later required", request_id)
        if hdrs.TRANSFER_ENCODING in request.headers:
            # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty
            return self._refuse(
                state, 400, "bad_request", "Transfer-Encoding in HTTP/1.0", request_id
            )
        return None

    def _expire(self, task: asyncio.Task[object], state: _RequestState) -> None:
        """The request's timer fired. During a streaming upload, progress since the
        last check re-arms it; otherwise the side the proxy waits on is to blame."""
        if state.uploading:
            if state.bytes_in != state.progress_mark:
                state.progress_mark = state.bytes_in
                state.timer = self._loop.call_later(self._idle_timeout, self._expire, task, state)
                return
            state.timed_out = CLIENT_TIMEOUT if state.reading_client else "upstream"
        else:
            state.timed_out = "upstream"
        task.cancel()

    async def _body(
        self, request: web.BaseRequest, state: _RequestState, task: asyncio.Task[object]
    ) -> AsyncIterator[bytes]:
        content = request.content
        if content.is_eof():  # the whole body arrived with the head: nothing to wait on
            while chunk := await content.readany():
                state.bytes_in += len(chunk)
                yield chunk
            return
        state.uploading = True
        state.timer.cancel()
        state.timer = self._loop.call_later(self._idle_timeout, self._expire, task, state)
        while True:
            state.reading_client = True
            chunk = await content.readany()
            state.reading_client = False
            if not chunk:
                break
            state.bytes_in += len(chunk)
            yield chunk
        # SPEC: the upstream timeout counts from the end of the request body
        state.uploading = False
        state.timer.cancel()
        state.timer = self._loop.call_later(self._timeout, self._expire, task, state)


def _ignore(chunk: bytes, now: float) -> None:
    pass


class _RequestState:
    """Mutable scratch state of one request; frozen into a TimingRecord at the end."""

    __slots__ = (
        "anatomy",
        "bytes_in",
        "bytes_out",
        "error",
        "first_byte_at",
        "headers_at",
        "progress_mark",
        "reading_client",
        "sent_at",
        "status",
        "stream",
        "timed_out",
        "timer",
        "uploading",
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
        self.timed_out: str | None = None
        self.error: str | None = None
        self.uploading = False
        self.reading_client = False
        self.progress_mark = 0
        self.timer: asyncio.TimerHandle
        self.anatomy: AnatomyFields = NO_ANATOMY  # streams, answers reporting usage: their own
