"""Proxy fidelity against a real upstream server (issue 2)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import time
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from sidecar.connections import GuardedHandler
from sidecar.demo.gateway import serve_gateway
from sidecar.forwarding import end_to_end

from .upstream import GZIP_BODY


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_every_method_and_query_forwarded(proxied, method):
    up, _, _, client, base = proxied
    body = b"" if method in ("GET", "OPTIONS") else b"payload-" + method.encode()
    async with client.request(method, f"{base}/echo/a%2Fb?x=1&y=%20z", data=body) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["method"] == method
    assert doc["path_qs"] == "/echo/a%2Fb?x=1&y=%20z"  # raw path, byte for byte
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()


async def test_binary_body_roundtrip_and_content_length_kept(proxied):
    up, _, _, client, base = proxied
    body = os.urandom(300_000)
    async with client.post(f"{base}/echo", data=body) as r:
        doc = await r.json()
        assert r.headers["Content-Length"] == str(len(await r.read()))
    assert doc["sha256"] == hashlib.sha256(body).hexdigest()
    headers = CIMultiDict(up.seen[-1]["headers"])
    assert headers["Content-Length"] == str(len(body))
    assert not up.seen[-1]["chunked"]


async def test_chunked_request_body_stays_chunked(proxied):
    up, _, _, client, base = proxied

    async def gen():
        for i in range(10):
            yield f"chunk-{i}|".encode()

    async with client.post(f"{base}/echo", data=gen()) as r:
        doc = await r.json()
    expected = b"".join(f"chunk-{i}|".encode() for i in range(10))
    assert doc["sha256"] == hashlib.sha256(expected).hexdigest()
    assert up.seen[-1]["chunked"]


async def test_chunked_response_is_streamed_chunked(proxied):
    _, _, _, client, base = proxied
    async with client.get(f"{base}/chunked") as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.headers
        assert await r.read() == b"part-0;part-1;part-2;part-3;part-4;"


async def test_large_transfers_are_streamed_not_buffered(proxied):
    """64 MiB each way through the proxy; the process's RSS must not grow by that much."""
    _, _, _, client, base = proxied
    size = 64 * 1024 * 1024
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = asyncio.Event()

    async def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    block = os.urandom(1 << 16)
    h = hashlib.sha256()

    async def upload():
        for _ in range(size // len(block)):
            h.update(block)
            yield block

    async with client.post(f"{base}/hash", data=upload()) as r:
        doc = await r.json()
    assert doc == {"len": size, "sha256": h.hexdigest()}

    got = 0
    async with client.get(f"{base}/download/{size}") as r:
        assert r.headers["Content-Length"] == str(size)
        async for chunk in r.content.iter_chunked(1 << 16):
            got += len(chunk)
    done.set()
    await sampler
    assert got == size
    assert peak - baseline < 40 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"


async def test_repeated_headers_kept(proxied):
    _, _, _, client, base = proxied
    async with client.get(f"{base}/cookies") as r:
        assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert r.headers.getall("X-Multi") == ["one", "two"]


async def test_gzip_passes_through_compressed(proxied):
    _, _, _, client, base = proxied
    async with client.get(f"{base}/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        raw = await r.read()
    assert raw == GZIP_BODY
    assert gzip.decompress(raw).startswith(b'{"hello"')


async def test_hop_by_hop_headers_dropped_both_ways(proxied):
    up, _, _, client, base = proxied
    headers = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Keep": "yes",
    }
    async with client.get(f"{base}/hop", headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Public"] == "yes"
        for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in r.headers
    seen = {k.lower(): v for k, v in up.seen[-1]["headers"]}
    assert seen["x-keep"] == "yes"
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen
    # the proxy-to-upstream connection's own Connection header is aiohttp's, not ours
    assert "x-drop-me" not in seen.get("connection", "").lower()


async def test_forwarded_headers_and_request_id(proxied):
    up, _, _, client, base = proxied
    async with client.get(f"{base}/echo", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
        assigned = r.headers["X-Request-Id"]
    seen = CIMultiDict(up.seen[-1]["headers"])
    assert seen["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == base.removeprefix("http://")
    assert seen["Host"] == base.removeprefix("http://")  # Host preserved, as Envoy does
    assert seen["X-Request-Id"] == assigned
    assert len(assigned) == 36  # a UUID

    async with client.get(f"{base}/echo", headers={"X-Request-Id": "req-abc"}) as r:
        assert r.headers["X-Request-Id"] == "req-abc"
    assert CIMultiDict(up.seen[-1]["headers"])["X-Request-Id"] == "req-abc"


async def test_sse_event_reaches_client_before_upstream_sends_the_rest(proxied):
    up, _, records, client, base = proxied
    async with client.get(f"{base}/sse") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        # The upstream holds the rest of the stream until we saw the first event: if the
        # proxy buffered, this read would time out.
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        up.sse_gate.set()
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    (rec,) = await records.wait_for(1)
    assert rec.stream is True
    assert rec.first_byte_at is not None and rec.first_byte_at < rec.end


async def test_hundreds_of_concurrent_slow_requests(proxied):
    up, _, _, client, base = proxied
    n = 300
    up.expect_arrivals = n
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
        tasks = [asyncio.create_task(many.get(f"{base}/hold")) for _ in range(n)]
        # all n must be in the upstream at once: nothing queues in the proxy
        await asyncio.wait_for(up.arrived_event.wait(), 20)
        up.release.set()
        responses = await asyncio.gather(*tasks)
        assert [r.status for r in responses] == [200] * n
        for r in responses:
            r.release()


async def test_502_fast_when_nothing_listens(make_sidecar, closed_port):
    sc = await make_sidecar(f"http://127.0.0.1:{closed_port}")
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as client:
        t0 = loop.time()
        async with client.get(f"http://127.0.0.1:{sc.proxy_port}/x") as r:
            body = await r.json()
        assert loop.time() - t0 < 1.0
    assert r.status == 502
    assert body["error"]["type"] == "upstream_connect"
    assert r.headers["X-Request-Id"]


async def test_504_at_the_timeout(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url, upstream_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as client:
        t0 = loop.time()
        async with client.get(f"http://127.0.0.1:{sc.proxy_port}/hang") as r:
            body = await r.json()
        elapsed = loop.time() - t0
    assert r.status == 504
    assert body["error"]["type"] == "upstream_timeout"
    assert 0.3 <= elapsed < 2.0


async def test_client_disconnect_cancels_upstream(proxied):
    up, _, records, _, base = proxied
    async with aiohttp.ClientSession() as own:
        task = asyncio.create_task(own.get(f"{base}/hang"))
        await asyncio.wait_for(up.started.wait(), 5)
        task.cancel()
    await asyncio.wait_for(up.cancelled.wait(), 5)
    (rec,) = await records.wait_for(1)
    assert rec.error == "client_disconnect"


def _gone_at_the_end(monkeypatch: pytest.MonkeyPatch, server: type) -> None:
    """The client of ``server``'s connections goes away just as the body's end is
    written: the transport is closing, as after a failed write to a reset socket."""
    write_eof = StreamWriter.write_eof

    async def closing_first(self: StreamWriter, chunk: bytes = b"") -> None:
        if isinstance(self.protocol, server) and self.transport is not None:
            self.transport.close()
        await write_eof(self, chunk)

    monkeypatch.setattr(StreamWriter, "write_eof", closing_first)


async def test_client_gone_at_the_bodys_end_is_a_disconnect_not_an_error(
    proxied, monkeypatch, caplog
):
    up, _, records, client, base = proxied
    _gone_at_the_end(monkeypatch, GuardedHandler)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{base}/chunked") as r:
            await r.read()
    (rec,) = await records.wait_for(1)
    assert (rec.status, rec.error) == (499, "client_disconnect")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_demo_gateway_stream_whose_client_went_away_logs_nothing(monkeypatch, caplog):
    runner = await serve_gateway("127.0.0.1", 0, seed=1)
    port = runner.addresses[0][1]
    _gone_at_the_end(monkeypatch, RequestHandler)
    try:
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "m", "stream": True, "messages": []},
                ) as r:
                    await r.read()
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_head_204_304(proxied):
    _, _, _, client, base = proxied
    async with client.head(f"{base}/download/1234") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "1234"
        assert await r.read() == b""
    async with client.get(f"{base}/status/204") as r:
        assert r.status == 204
        assert await r.read() == b""
    async with client.get(f"{base}/status/304") as r:
        assert r.status == 304
        assert r.headers["ETag"] == '"v1"'


async def test_expect_100_continue(proxied):
    """A raw client that waits for 100 Continue before sending its body."""
    _, _, _, _, base = proxied
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"x": 1}'
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_client_gone_at_the_100_continue_is_a_disconnect_not_an_error(
    proxied, monkeypatch, caplog
):
    _, sc, records, _, _ = proxied
    write = StreamWriter.write

    async def closing_first(self: StreamWriter, chunk: bytes, **kwargs: Any) -> None:
        if bytes(chunk).startswith(b"HTTP/1.1 100") and self.transport is not None:
            self.transport.close()
        await write(self, chunk, **kwargs)

    monkeypatch.setattr(StreamWriter, "write", closing_first)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
    (rec,) = await records.wait_for(1)
    assert (rec.status, rec.error) == (499, "client_disconnect")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_websocket_upgrade_is_forwarded(proxied):
    """Tunnelling is tests/test_websocket.py's; here: the upstream's refusal comes back."""
    _, _, _, client, base = proxied
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await asyncio.wait_for(client.ws_connect(f"{base}/ws"), 5)
    assert exc.value.status == 404  # tests/upstream.py has no /ws


async def test_timing_record(proxied):
    _, _, records, client, base = proxied
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with client.post(
        f"{base}/echo/123?q=1", data=b"12345", headers={"traceparent": tp, "X-Request-Id": "r1"}
    ) as r:
        await r.read()
    (rec,) = await records.wait_for(1)
    assert rec.method == "POST"
    assert rec.route == "/echo/{id}"
    assert rec.status == 200
    assert rec.bytes_in == 5 and rec.bytes_out > 0
    assert rec.request_id == "r1"
    assert rec.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rec.error is None and rec.stream is False
    assert rec.headers_at is not None and rec.first_byte_at is not None
    assert rec.sent_at is not None and rec.upstream_end is not None
    # every timestamp in its field: the record is built positionally for speed
    assert rec.start <= rec.sent_at <= rec.headers_at <= rec.first_byte_at
    assert rec.first_byte_at <= rec.upstream_end <= rec.end
    assert abs(rec.wall - time.time()) < 60
    assert rec.latency == rec.end - rec.start
    # latency anatomy: a unary answer without usage has none of it
    assert rec.first_token_at is None and rec.time_per_token is None
    assert rec.output_tokens is None and rec.input_tokens is None
    with pytest.raises(AttributeError):
        rec.status = 500
    assert json.dumps(rec._asdict())
    # a stream with usage: each anatomy field in its place
    body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Test-TTFT-Ms": "50", "X-Test-Gap-Ms": "5", "X-Test-Tokens": "3"}
    async with client.post(f"{base}/llm/chat/completions", json=body, headers=headers) as r:
        await r.read()
    stream = (await records.wait_for(2))[1]
    assert stream.stream and stream.latency == stream.first_byte_at - stream.start
    assert stream.first_byte_at + 0.04 < stream.first_token_at <= stream.upstream_end
    assert stream.output_tokens == 3 and stream.input_tokens == 2  # len("[]")
    assert 0.004 < stream.time_per_token < 0.05


async def test_proxy_adds_no_headers_of_its_own(proxied):
    """A bare request (Host only) reaches the upstream with the forwarding headers and
    nothing else: no Accept, Accept-Encoding, User-Agent or Content-Type invented."""
    up, _, _, _, base = proxied
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    names = {k.lower() for k, _ in up.seen[-1]["headers"]}
    assert names == {
        "host", "content-length", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "x-request-id",
    }  # fmt: skip


_NGINX_HEAD = [(b"Server", b"nginx"), (b"Content-Length", b"2")]


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ([], []),
        (_NGINX_HEAD, _NGINX_HEAD),
        ([*_NGINX_HEAD, (b"Connection", b"keep-alive")], _NGINX_HEAD),
        ([(b"CONNECTION", b" Close "), *_NGINX_HEAD, (b"keep-alive", b"t=5")], _NGINX_HEAD),
        # named in Connection: dropped, in any case, wherever they stand
        (
            [(b"X-A", b"1"), (b"Connection", b"keep-alive, x-a,X-B"), (b"x-b", b"2"),
             (b"X-C", b"3")],
            [(b"X-C", b"3")],
        ),
        # a second Connection header names more, after a plain first one
        (
            [(b"Connection", b"keep-alive"), (b"connection", b"X-A"), (b"X-A", b"1"),
             *_NGINX_HEAD],
            _NGINX_HEAD,
        ),
        # Host and Content-Length cannot be named away; repeats and bytes kept as sent
        (
            [(b"Host", b"h"), (b"Content-Length", b"2"), (b"Connection", b"host, content-length"),
             (b"X-R", b"\xff"), (b"X-R", b"2"), (b"TE", b"trailers"), (b"Upgrade", b"ws")],
            [(b"Host", b"h"), (b"Content-Length", b"2"), (b"X-R", b"\xff"), (b"X-R", b"2")],
        ),
    ],
)  # fmt: skip
def test_end_to_end_drops_what_is_hop_by_hop_or_named_in_connection(
    raw: list[tuple[bytes, bytes]], kept: list[tuple[bytes, bytes]]
) -> None:
    assert end_to_end(raw) == kept
    assert end_to_end(tuple(raw)) == kept  # aiohttp hands over tuples


async def test_hop_by_hop_names_match_in_any_case(proxied):
    """Header names are case-insensitive: lower-case hop-by-hop headers (Node and Go
    clients send them so) are dropped too, and a chunked response is not doubly
    framed."""
    up, _, _, _, base = proxied
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /hop-lower HTTP/1.1\r\nhost: gw\r\nconnection: keep-alive, x-drop-me\r\n"
        b"x-drop-me: 1\r\nkeep-alive: timeout=5\r\nte: trailers\r\n"
        b"proxy-authorization: Basic eA==\r\nx-keep: yes\r\n\r\n"
    )
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    assert head.startswith("http/1.1 200")
    assert head.count("transfer-encoding") == 1 and "x-public: yes" in head
    assert "x-private" not in head and "keep-alive: timeout" not in head
    assert b"lower" in body
    seen = {k.lower() for k, _ in up.seen[-1]["headers"]}
    assert "x-keep" in seen
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name


async def test_stale_keep_alive_connection_is_retried_only_when_safe(make_sidecar):
    """An upstream that answers one request per connection, then drops the connection
    when the next request arrives on it (a keep-alive race every proxy meets). GETs are
    retried once on a fresh connection; a POST is not (it may have been processed)."""
    connections = 0

    async def serve(reader, writer):
        nonlocal connections
        connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the next request: drop it unanswered
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sc = await make_sidecar(f"http://127.0.0.1:{port}")
    base = f"http://127.0.0.1:{sc.proxy_port}"
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{base}/x") as r:
                assert r.status == 200 and await r.read() == b"ok"
        # the connection that served the last GET is pooled; a POST on it hits the drop
        # and is not retried (it may have been processed)
        async with client.post(f"{base}/x", data=b"body") as r:
            assert r.status == 502
        async with client.get(f"{base}/x") as r:
            assert r.status == 200
        async with client.post(f"{base}/x", data=b"body") as r:
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "upstream_reset"
    assert connections >= 4
    server.close()
    await server.wait_closed()


async def test_garbage_from_the_upstream_is_a_502(make_sidecar):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")  # not HTTP
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    sc = await make_sidecar(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{sc.proxy_port}/x") as r,
    ):
        assert r.status == 502
        body = await r.json()
    assert body["error"]["type"] == "upstream_reset"
    assert "invalid response" in body["error"]["message"]
    # the upstream's bytes and address stay out of what the client reads
    port = str(server.sockets[0].getsockname()[1])
    assert "SSH" not in json.dumps(body) and port not in json.dumps(body)
    assert "Server" not in r.headers
    server.close()
    await server.wait_closed()


async def test_upstream_head_bytes_reach_the_client_unchanged(make_sidecar):
    """Name case, order, repeats and non-UTF-8 bytes of the upstream's headers arrive as
    sent; nothing is added (no Server, Date or Content-Type of the sidecar's own)."""
    head = (
        b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nx-lower: MiXeD\r\nContent-Disposition: '
        b"attachment; filename=caf\xe9.txt\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    sc = await make_sidecar(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Request-Id: rid\r\nConnection: close\r\n\r\n")
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    server.close()
    await server.wait_closed()
    status, _, rest = got.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    lines = rest.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert lines == [
        b'ETag: "v1"',
        b"x-lower: MiXeD",
        b"Content-Disposition: attachment; filename=caf\xe9.txt",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
        b"Content-Length: 2",
        b"X-Request-Id: rid",  # the upstream sent none: the client's id goes back
        b"Connection: close",
    ]
    assert got.endswith(b"\r\n\r\nok")
