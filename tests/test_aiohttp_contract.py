"""The aiohttp internals the proxy stands on, checked one by one.

`sidecar/upstream.py` drives aiohttp's HTTP/1.1 client protocol without
`ClientSession`, `sidecar/proxy.py` writes response heads itself, and
`sidecar/connections.py` extends aiohttp's server connection handler. Those are not
public API: this file is the list of what is used, and it fails naming the internal
that changed when a new aiohttp release moves one. pyproject.toml allows only the
aiohttp releases tested: `make test` runs everything on the newest (the one pinned in
constraints.txt), `make test-aiohttp-lowest` this file and the proxy-facing test files
on the lowest; `.ci/run` runs both.
"""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

METHODS = [
    # (owner, name, why we need it)
    (ResponseHandler, "set_response_params", "upstream.py configures the response parser"),
    (ResponseHandler, "read", "upstream.py awaits the response head"),
    (ResponseHandler, "is_connected", "upstream.py checks idle connections"),
    (ResponseHandler, "close", "upstream.py discards connections"),
    (StreamWriter, "enable_chunking", "upstream.py frames a request body"),
    (StreamWriter, "write", "upstream.py writes request bodies"),
    (StreamWriter, "write_eof", "upstream.py ends a request"),
    (StreamWriter, "send_headers", "proxy.py sends a response head at once"),
    (StreamReader, "iter_any", "proxy.py streams the upstream body"),
    (StreamReader, "readany", "proxy.py streams the client body"),
    (StreamReader, "is_eof", "proxy.py tells a complete body from an upload"),
    (web.StreamResponse, "_prepare_headers", "proxy.py frames responses itself"),
    (web.StreamResponse, "_write_headers", "proxy.py and responses.py write heads"),
    (web.StreamResponse, "_start", "calls the two above, in that order"),
    (RequestHandler, "data_received", "connections.py watches request heads"),
    (RequestHandler, "handle_error", "connections.py answers bad requests"),
    (RequestHandler, "connection_made", "connections.py counts connections"),
    (RequestHandler, "connection_lost", "connections.py counts connections"),
    (web.AppRunner, "_make_server", "connections.py guards the admin listener"),
    (RequestHandler, "set_parser", "tunnel.py takes bytes read past an upgrade request"),
    (ResponseHandler, "set_parser", "tunnel.py takes bytes read past a 101"),
    (RequestHandler, "finish_response", "tunnel.py: prepare and write_eof of a tunnel"),
]

ATTRIBUTES = [
    # (owner class, slot or attribute set in __init__, why)
    (RequestHandler, "_request_count", "connections.py: a complete head arrived"),
    (RequestHandler, "_current_request", "connections.py: a request is being handled"),
    (RequestHandler, "_messages", "connections.py: parsed requests are queued"),
    (RequestHandler, "_loop", "connections.py: timers"),
    (web.StreamResponse, "_req", "proxy.py: the request a response answers"),
    (web.StreamResponse, "_payload_writer", "proxy.py: the writer of the head"),
    (web.StreamResponse, "_keep_alive", "proxy.py: keep-alive decision"),
    (web.StreamResponse, "_must_be_empty_body", "proxy.py: HEAD/204/304 (set by prepare)"),
    (web.StreamResponse, "_status", "proxy.py: status line"),
    (web.StreamResponse, "_reason", "proxy.py: status line"),
    (web.StreamResponse, "_headers", "responses.py: drop Server"),
    (StreamWriter, "_headers_buf", "proxy.py: the buffered head"),
    (StreamWriter, "_headers_written", "proxy.py: the buffered head"),
    (StreamWriter, "length", "proxy.py: Content-Length framing"),
    (web.StreamResponse, "_send_headers_immediately", "proxy.py: stream heads go at once"),
]


@pytest.mark.parametrize(("owner", "name", "why"), METHODS)
def test_method_exists(owner, name, why):
    assert callable(getattr(owner, name, None)), (
        f"aiohttp {aiohttp.__version__}: {owner.__qualname__}.{name} is gone ({why})"
    )


async def _instances() -> dict[type, object]:
    """One live object of each class whose attributes we read."""
    loop = asyncio.get_running_loop()

    async def ok(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(ok)
    handler = server()
    proto = ResponseHandler(loop)
    return {
        RequestHandler: handler,
        web.StreamResponse: web.StreamResponse(),
        StreamWriter: StreamWriter(proto, loop),
    }


@pytest.mark.parametrize(("owner", "name", "why"), ATTRIBUTES)
async def test_attribute_exists(owner, name, why):
    instance = (await _instances())[owner]
    assert hasattr(instance, name), (
        f"aiohttp {aiohttp.__version__}: {owner.__qualname__}.{name} is gone ({why})"
    )


def test_response_start_prepares_then_writes_the_head():
    source = inspect.getsource(web.StreamResponse._start)
    prepare, write = source.find("_prepare_headers"), source.find("_write_headers")
    assert 0 <= prepare < write, (
        f"aiohttp {aiohttp.__version__}: StreamResponse._start no longer calls "
        "_prepare_headers then _write_headers (proxy.py overrides both)"
    )


def test_buffered_head_is_sent_with_the_first_write():
    source = inspect.getsource(StreamWriter.write)
    assert "_headers_buf" in source and "_headers_written" in source, (
        f"aiohttp {aiohttp.__version__}: StreamWriter.write no longer sends the head "
        "buffered in _headers_buf (proxy.py stores it there)"
    )


def test_server_builds_handlers_from_its_kwargs():
    source = inspect.getsource(web.Server.__init__)
    for name in ("_kwargs", "_loop", "_connections", "request_factory", "request_handler"):
        assert f"self.{name}" in source, (
            f"aiohttp {aiohttp.__version__}: web.Server.{name} is gone "
            "(connections.GuardedServer uses it)"
        )


def test_set_parser_hands_over_the_bytes_read_past_a_head():
    for owner in (RequestHandler, ResponseHandler):
        source = inspect.getsource(owner.set_parser)
        assert "_tail" in source, (
            f"aiohttp {aiohttp.__version__}: {owner.__qualname__}.set_parser no longer "
            "feeds the bytes buffered after the head to the new parser (tunnel.py)"
        )


def test_a_handlers_response_is_prepared_then_ended():
    source = inspect.getsource(RequestHandler.finish_response)
    assert 0 <= source.find("await prepare_meth(") < source.find("await resp.write_eof("), (
        f"aiohttp {aiohttp.__version__}: RequestHandler.finish_response no longer calls "
        "prepare() then write_eof() (tunnel._TunnelResponse overrides both)"
    )


def test_http_versions_compare_as_tuples():
    assert HttpVersion10 < HttpVersion11 and HttpVersion11 == (1, 1)


async def test_response_handler_parses_a_response_head():
    """The client protocol end to end on a raw server: what upstream.py relies on."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nETag: "x"\r\nContent-Length: 2\r\n\r\nok')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        _, proto = await loop.create_connection(lambda: ResponseHandler(loop), "127.0.0.1", port)
        proto.set_response_params(
            skip_payload=False, read_until_eof=True, auto_decompress=False, read_bufsize=2**16
        )
        assert proto.transport is not None
        proto.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        message, payload = await asyncio.wait_for(proto.read(), 5)
        for name in ("code", "reason", "headers", "raw_headers"):  # RawResponseMessage
            assert hasattr(message, name), f"aiohttp {aiohttp.__version__}: message.{name}"
        assert message.code == 200
        assert (b"ETag", b'"x"') in message.raw_headers  # bytes and case as sent
        assert await payload.read() == b"ok"
        proto.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_request_holds_its_connection_handler_as_protocol():
    """proxy.py reads ``request._protocol`` (the handler that read the head, for its
    ``head_at``) instead of the ``protocol`` property, a call less per request."""
    seen: list[bool] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request._protocol is request.protocol)
        return web.Response()

    server = await asyncio.get_running_loop().create_server(web.Server(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/"):
            pass
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [True], f"aiohttp {aiohttp.__version__}: BaseRequest._protocol is gone"
