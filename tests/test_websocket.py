"""WebSocket passthrough (SPEC "Upgrades: WebSocket passthrough"): real aiohttp WebSocket
servers upstream, real aiohttp clients (and raw sockets for the abuse cases) through a
real sidecar — in this process (asyncio) or as a subprocess (uvloop, for RSS and SIGTERM).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from sidecar.server import Sidecar
from sidecar.tunnel import FrameScanner

from .conftest import Records, observed_sidecar, serve_app
from .process import SidecarProcess, spawn_sidecar

MiB = 1 << 20
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key


class WsUpstream:
    """WebSocket endpoints; they record what they saw and how each session ended."""

    def __init__(self) -> None:
        self.heads: list[CIMultiDict[str]] = []
        self.close_codes: list[int | None] = []
        self.ended = asyncio.Event()
        self.sent = 0  # bytes /flood has handed to aiohttp so far
        self.flood_done = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/ws", self.echo)
        r.add_get("/v1/realtime", self.realtime)
        r.add_get("/forbidden", self.forbidden)
        r.add_get("/flood/{mib}", self.flood)
        r.add_get("/plain", self.plain)
        return app

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        """Echoes; text commands: ``close:<code>``, ``drop`` (TCP closed without a Close
        frame), ``ping:<data>`` (the upstream pings the client)."""
        self.heads.append(request.headers.copy())
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"), max_msg_size=4 * MiB)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"upstream says bye")
                    break
                if msg.data == "drop":
                    assert request.transport is not None
                    request.transport.close()
                    break
                if msg.data.startswith("ping:"):
                    await ws.ping(msg.data[5:].encode())
                    continue
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.close_codes.append(ws.close_code)
        self.ended.set()
        return ws

    async def realtime(self, request: web.Request) -> web.WebSocketResponse:
        """OpenAI-Realtime-shaped: answers JSON events with JSON events."""
        self.heads.append(request.headers.copy())
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "session.created", "session": {"id": "sess_1"}})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            if event["type"] == "session.update":
                await ws.send_json({"type": "session.updated", "session": event["session"]})
            elif event["type"] == "input_audio_buffer.append":
                size = len(event["audio"])
                await ws.send_json({"type": "input_audio_buffer.committed", "bytes": size})
            elif event["type"] == "response.create":
                for delta in ("Hel", "lo", "!"):
                    await ws.send_json({"type": "response.output_text.delta", "delta": delta})
                await ws.send_json({"type": "response.done", "response": {"status": "completed"}})
        self.ended.set()
        return ws

    async def forbidden(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "no websocket for you"}, status=403)

    async def plain(self, request: web.Request) -> web.Response:
        self.heads.append(request.headers.copy())
        return web.json_response({"upgrade": request.headers.get("Upgrade")})

    async def flood(self, request: web.Request) -> web.WebSocketResponse:
        """Sends ``mib`` binary messages of 1 MiB as fast as the connection takes them."""
        ws = web.WebSocketResponse(max_msg_size=4 * MiB)
        await ws.prepare(request)
        block = os.urandom(MiB)
        try:
            for _ in range(int(request.match_info["mib"])):
                await ws.send_bytes(block)
                self.sent += len(block)
            await ws.send_str(hashlib.sha256(block).hexdigest())
            await ws.receive()
        except (ConnectionError, aiohttp.ClientError):
            pass
        finally:
            self.flood_done.set()
        return ws


@pytest.fixture
async def ws_upstream() -> AsyncIterator[tuple[WsUpstream, str]]:
    up = WsUpstream()
    async with serve_app(up.app()) as url:
        yield up, url


@pytest.fixture
async def through(
    ws_upstream: tuple[WsUpstream, str], make_sidecar: Any
) -> AsyncIterator[tuple[WsUpstream, Sidecar, Records, aiohttp.ClientSession, str]]:
    up, url = ws_upstream
    async with observed_sidecar(make_sidecar, url) as observed:
        yield (up, *observed)


def sample(sc: Sidecar, name: str, **labels: str) -> float:
    value = sc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sessions_ended(sc: Sidecar, route: str, close: str) -> float:
    return sample(sc, "sidecar_websocket_session_seconds_count", route=route, close=close)


async def all_closed(sc: Sidecar) -> None:
    await asyncio.wait_for(sc.proxy.tunnels.wait_closed(), 10)


async def test_messages_from_1_byte_to_1_mib_are_byte_identical(through):
    up, sc, records, client, base = through
    sizes = [1, 125, 126, 127, 65535, 65536, 65537, MiB]
    async with client.ws_connect(f"{base}/ws", max_msg_size=4 * MiB) as ws:
        assert sample(sc, "sidecar_websocket_active") == 1
        for size in sizes:
            text = "é" * (size // 2) + "x" * (size % 2)  # multi-byte UTF-8
            await ws.send_str(text)
            got = await ws.receive(timeout=10)
            assert got.type == WSMsgType.TEXT and got.data == text
            blob = os.urandom(size)
            await ws.send_bytes(blob)
            got = await ws.receive(timeout=10)
            assert got.type == WSMsgType.BINARY and got.data == blob
    await all_closed(sc)
    assert sample(sc, "sidecar_websocket_active") == 0
    payload = 2 * sum(len(("é" * (s // 2) + "x" * (s % 2)).encode()) for s in sizes)
    sent = sample(sc, "sidecar_websocket_bytes_total", route="/ws", direction="in")
    back = sample(sc, "sidecar_websocket_bytes_total", route="/ws", direction="out")
    assert payload < sent < payload + 1000  # frame headers and masks, the Close frame
    assert payload < back < payload + 1000
    assert sample(sc, "sidecar_websocket_handshake_seconds_count", route="/ws") == 1
    assert sessions_ended(sc, "/ws", "client") == 1
    # a session is not a request: no record, no request histogram, no percentiles
    assert records.items == []
    assert sample(sc, "sidecar_requests_in_flight") == 0
    assert not any(
        s.labels.get("route") == "/ws"
        for m in sc.metrics.registry.collect()
        if m.name == "sidecar_request_duration_seconds"
        for s in m.samples
    )
    assert "/ws" not in {route for route, _ in sc.percentiles.snapshot().stats}


async def test_handshake_headers_and_subprotocol_negotiation(through):
    up, sc, _, client, base = through
    async with client.ws_connect(
        f"{base}/ws", protocols=("chat.v3", "chat.v1"), headers={"Authorization": "Bearer k"}
    ) as ws:
        assert ws.protocol == "chat.v1"  # the upstream's choice, relayed
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"
    head = up.heads[0]
    assert head["Upgrade"] == "websocket"
    assert "upgrade" in head["Connection"].lower()
    assert head["Sec-WebSocket-Protocol"] == "chat.v3,chat.v1"  # as aiohttp sent it
    assert head["Sec-WebSocket-Version"] == "13"
    assert "Sec-WebSocket-Key" in head
    assert head["Authorization"] == "Bearer k"
    assert head["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Request-Id" in head


async def test_ping_pong_both_ways(through):
    _, _, _, client, base = through
    async with client.ws_connect(f"{base}/ws", autoping=False) as ws:
        await ws.ping(b"from-client")
        pong = await ws.receive(timeout=5)
        assert pong.type == WSMsgType.PONG and pong.data == b"from-client"
        await ws.send_str("ping:from-upstream")
        ping = await ws.receive(timeout=5)
        assert ping.type == WSMsgType.PING and ping.data == b"from-upstream"
        await ws.pong(ping.data)
        await ws.send_str("still here")
        assert (await ws.receive(timeout=5)).data == "still here"


@pytest.mark.parametrize("code", [1000, 4001])
async def test_client_closes_with_its_code(through, code):
    up, sc, _, client, base = through
    async with client.ws_connect(f"{base}/ws") as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        await ws.close(code=code, message=b"client says bye")
    await asyncio.wait_for(up.ended.wait(), 5)
    assert up.close_codes == [code]
    await all_closed(sc)
    assert sessions_ended(sc, "/ws", "client") == 1
    assert sessions_ended(sc, "/ws", "upstream") == 0


@pytest.mark.parametrize("code", [1000, 4001])
async def test_upstream_closes_with_its_code(through, code):
    _, sc, _, client, base = through
    async with client.ws_connect(f"{base}/ws") as ws:
        await ws.send_str(f"close:{code}")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (code, "upstream says bye")
    assert ws.close_code == code
    await all_closed(sc)
    assert sessions_ended(sc, "/ws", "upstream") == 1
    assert sessions_ended(sc, "/ws", "client") == 0


async def test_upstream_dropping_tcp_without_close_frame_is_an_error(through):
    _, sc, _, client, base = through
    async with client.ws_connect(f"{base}/ws") as ws:
        await ws.send_str("drop")
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSE, WSMsgType.ERROR)
        assert ws.close_code == 1006  # abnormal closure: no Close frame came
    await all_closed(sc)
    assert sessions_ended(sc, "/ws", "error") == 1
    assert sessions_ended(sc, "/ws", "upstream") == 0


async def test_permessage_deflate_passes_through(through):
    _, sc, _, client, base = through
    text = '{"type": "response.output_text.delta", "delta": "hello"}' * 2000
    async with client.ws_connect(f"{base}/ws", compress=15) as ws:
        assert ws.compress == 15  # negotiated end to end
        assert "permessage-deflate" in ws._response.headers["Sec-WebSocket-Extensions"]
        for _ in range(3):
            await ws.send_str(text)
            assert (await ws.receive(timeout=5)).data == text
    await all_closed(sc)
    # what went through was compressed: the tunnel never inflated it
    out = sample(sc, "sidecar_websocket_bytes_total", route="/ws", direction="out")
    assert 0 < out < len(text)


async def test_50_concurrent_sessions(through):
    _, sc, _, client, base = through
    opened = asyncio.Event()
    count = 0

    async def session(i: int) -> list[str]:
        nonlocal count
        async with client.ws_connect(f"{base}/ws") as ws:
            count += 1
            if count == 50:
                opened.set()
            await asyncio.wait_for(opened.wait(), 20)
            got = []
            for j in range(5):
                await ws.send_str(f"{i}-{j}")
                got.append((await ws.receive(timeout=10)).data)
            await ws.send_str("close:1000")
            await ws.receive(timeout=10)
            return got

    async def active_when_all_open() -> float:
        await asyncio.wait_for(opened.wait(), 20)
        return sample(sc, "sidecar_websocket_active")

    results = await asyncio.gather(active_when_all_open(), *(session(i) for i in range(50)))
    assert results[0] == 50
    for i, got in enumerate(results[1:]):
        assert got == [f"{i}-{j}" for j in range(5)]
    await all_closed(sc)
    assert sessions_ended(sc, "/ws", "upstream") == 50
    assert sample(sc, "sidecar_websocket_active") == 0


async def test_realtime_shaped_json_events(through):
    up, sc, records, client, base = through
    headers = {"Authorization": "Bearer sk-test", "OpenAI-Beta": "realtime=v1"}
    async with client.ws_connect(f"{base}/v1/realtime?model=gpt-realtime", headers=headers) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
        session = {"modalities": ["text"], "instructions": "Be brief.", "voice": "alloy"}
        await ws.send_json({"type": "session.update", "session": session})
        assert await ws.receive_json(timeout=5) == {"type": "session.updated", "session": session}
        await ws.send_json({"type": "input_audio_buffer.append", "audio": "UklGRg==" * 1000})
        assert (await ws.receive_json(timeout=5))["bytes"] == 8000
        await ws.send_json({"type": "response.create", "response": {"modalities": ["text"]}})
        deltas = []
        while (event := await ws.receive_json(timeout=5))["type"] != "response.done":
            deltas.append(event["delta"])
        assert "".join(deltas) == "Hello!"
    assert up.heads[0]["OpenAI-Beta"] == "realtime=v1"
    await all_closed(sc)
    assert sessions_ended(sc, "/v1/realtime", "client") == 1
    assert records.items == []


async def test_a_refused_handshake_is_a_normal_response(through):
    _, sc, records, client, base = through
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await client.ws_connect(f"{base}/forbidden")
    assert exc.value.status == 403
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": KEY}  # fmt: skip
    async with client.get(f"{base}/forbidden", headers=upgrade) as r:
        assert r.status == 403
        assert await r.json() == {"error": "no websocket for you"}
        assert "Upgrade" not in r.headers
    recorded = await records.wait_for(2)
    assert [(r.route, r.status) for r in recorded] == [("/forbidden", 403)] * 2
    assert sample(sc, "sidecar_websocket_handshake_seconds_count", route="/forbidden") == 0
    async with client.get(f"{base}/plain") as r:  # the same pool still serves HTTP
        assert r.status == 200


async def test_h2c_offer_is_still_served_as_http11(through):
    up, _, records, client, base = through
    h2c = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
           "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}  # fmt: skip
    async with client.get(f"{base}/plain", headers=h2c) as r:
        assert r.status == 200 and r.version == aiohttp.HttpVersion11
        assert await r.json() == {"upgrade": None}
    assert "HTTP2-Settings" not in up.heads[0]
    assert (await records.wait_for(1))[0].status == 200


async def test_upgrade_in_http10_is_ignored(through):
    up, _, _, _, base = through
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /plain HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % KEY.encode()
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 200")
    assert b'{"upgrade": null}' in answer


async def raw_upstream(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the sidecar went away: what the test checks is on the other side
        finally:
            writer.close()  # every accepted socket closed, whatever the handler did

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_upstream_switching_protocols_unasked_is_a_502(make_sidecar):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")  # fmt: skip
        await reader.read()

    server, url = await raw_upstream(serve)
    async with server:
        sc = await make_sidecar(url)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{sc.proxy_port}/x") as r,
        ):
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "upstream_reset"


async def test_half_close_of_a_non_websocket_upgrade(make_sidecar):
    """A raw protocol: the upstream echoes until the client's end of stream, then says
    END and closes. The client's FIN must reach it while the other direction flows."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"\r\nUpgrade: echo\r\n" in head and b"Connection: Upgrade" in head
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: echo\r\n\r\nhello ")  # fmt: skip
        while data := await reader.read(65536):
            writer.write(data)
        writer.write(b"END")
        await writer.drain()
        writer.close()

    server, url = await raw_upstream(serve)
    async with server:
        sc = await make_sidecar(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(
            b"GET /raw HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nUpgrade: echo\r\n" in head
        writer.write(b"a" * 300_000)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)  # until the sidecar closes
        writer.close()
        assert rest == b"hello " + b"a" * 300_000 + b"END"
        await all_closed(sc)
        assert sessions_ended(sc, "/raw", "client") == 1  # its end of stream came first


async def test_shutdown_gives_sessions_the_grace_period_then_closes_them(ws_upstream, make_sidecar):
    up, url = ws_upstream
    sc = await make_sidecar(url, shutdown_grace_s=1.5)
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"http://127.0.0.1:{sc.proxy_port}/ws") as ws,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        drain = asyncio.create_task(sc.drain())
        await asyncio.sleep(0)
        assert sc.proxy.draining
        for i in range(3):  # still a working session during the grace period
            await ws.send_str(f"during-{i}")
            assert (await ws.receive(timeout=5)).data == f"during-{i}"
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001  # going away
        assert loop.time() - t0 >= 1.4
        await asyncio.wait_for(drain, 10)
    await asyncio.wait_for(up.ended.wait(), 5)
    assert up.close_codes == [1001]  # the upstream was told too
    assert sessions_ended(sc, "/ws", "shutdown") == 1


async def test_drain_ends_early_when_sessions_end(ws_upstream, make_sidecar):
    _, url = ws_upstream
    sc = await make_sidecar(url, shutdown_grace_s=30)
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(f"http://127.0.0.1:{sc.proxy_port}/ws")
        drain = asyncio.create_task(sc.drain())
        await ws.close()
        await asyncio.wait_for(drain, 10)
    assert sessions_ended(sc, "/ws", "client") == 1


# --- subprocess sidecar (uvloop): SIGTERM, memory, abuse ---


async def rss(sc: SidecarProcess) -> int:
    return int(psutil.Process(sc.proc.pid).memory_info().rss)


async def metric(sc: SidecarProcess, client: aiohttp.ClientSession, line_start: str) -> float:
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
async def test_sigterm_with_open_sessions(ws_upstream):
    up, url = ws_upstream
    sc = await spawn_sidecar(url, SIDECAR_SHUTDOWN_GRACE_S="3")
    async with aiohttp.ClientSession() as client:
        sessions = [await client.ws_connect(f"{sc.base}/ws") for _ in range(3)]
        sc.terminate()
        async with asyncio.timeout(5):
            while True:
                async with client.get(f"{sc.admin}/readyz") as r:
                    if r.status == 503:
                        break
        for i, ws in enumerate(sessions):  # still served while the grace period runs
            await ws.send_str(f"after-sigterm-{i}")
            assert (await ws.receive(timeout=5)).data == f"after-sigterm-{i}"
        assert sc.proc.returncode is None
        for ws in sessions:
            msg = await ws.receive(timeout=10)
            assert msg.type == WSMsgType.CLOSE and msg.data == 1001
    assert await sc.wait(15) == 0
    assert up.close_codes == [1001, 1001, 1001]


@pytest.mark.slow
async def test_rss_with_50_sessions_and_with_a_slow_reader(ws_upstream):
    up, url = ws_upstream
    sc = await spawn_sidecar(url)
    try:
        async with aiohttp.ClientSession() as client:
            warm = await client.ws_connect(f"{sc.base}/ws")
            await warm.send_bytes(os.urandom(MiB))
            await warm.receive(timeout=10)
            await warm.close()
            base_rss = await rss(sc)
            sessions = [await client.ws_connect(f"{sc.base}/ws") for _ in range(50)]
            for ws in sessions:
                await ws.send_str("x" * 1000)
            for ws in sessions:
                assert (await ws.receive(timeout=10)).data == "x" * 1000
            assert await metric(sc, client, "sidecar_websocket_active ") == 50
            with_50 = await rss(sc)
            print(f"\nsidecar RSS: idle {base_rss >> 20} MiB, 50 sessions {with_50 >> 20} MiB")
            assert with_50 - base_rss < 20 * MiB
            for ws in sessions:
                await ws.close()

            # a client that stops reading while the upstream writes 256 MiB as fast as it can
            ws = await client.ws_connect(f"{sc.base}/flood/256", max_msg_size=4 * MiB)
            stalled_at = -1
            async with asyncio.timeout(20):
                while up.sent != stalled_at:  # backpressure reached the upstream
                    stalled_at = up.sent
                    await asyncio.sleep(0.5)
            stalled_rss = await rss(sc)
            print(f"slow reader: upstream stalled after {up.sent >> 20} MiB, "
                  f"sidecar RSS {stalled_rss >> 20} MiB")  # fmt: skip
            assert up.sent < 64 * MiB  # kernel buffers and one write buffer per side
            assert stalled_rss - base_rss < 30 * MiB
            got = 0
            digest = ""
            peak = stalled_rss
            while True:  # now read it all, slowly at first
                msg = await ws.receive(timeout=20)
                if msg.type == WSMsgType.TEXT:
                    digest = msg.data
                    break
                assert msg.type == WSMsgType.BINARY
                got += len(msg.data)
                if got == 16 * MiB:
                    last = msg.data
                if got < 32 * MiB:
                    await asyncio.sleep(0.02)
                    peak = max(peak, await rss(sc))
            assert got == 256 * MiB
            assert digest == hashlib.sha256(last).hexdigest()
            assert peak - base_rss < 30 * MiB
            await ws.close()
    finally:
        sc.terminate()
        await sc.wait()


@pytest.mark.slow
async def test_abuse_cases(ws_upstream):
    up, url = ws_upstream
    sc = await spawn_sidecar(url, SIDECAR_CLIENT_IDLE_TIMEOUT_S="1")

    async def handshake(path: str, key: str = KEY, extra: bytes = b"") -> tuple[Any, Any, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n".encode()
            + extra
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return reader, writer, head

    try:
        async with aiohttp.ClientSession() as client:
            # a bad Sec-WebSocket-Key: the upstream's refusal comes back as it was
            reader, writer, head = await handshake("/ws", key="not-a-key")
            assert head.startswith(b"HTTP/1.1 400 ")
            writer.close()

            # a frame in the same packet as the handshake reaches the upstream
            frame = masked_frame(0x1, b"early bird")
            reader, writer, head = await handshake("/ws", extra=frame)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await asyncio.wait_for(reader.readexactly(12), 5) == b"\x81\x0aearly bird"

            # garbage after the 101: the upstream refuses it (1002), nothing breaks here
            writer.write(os.urandom(4096))
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert rest[:2] == b"\x88\x02" or rest == b""  # its Close frame, or just the end

            # a frame header announcing 2**63 - 1 payload bytes, then a trickle
            reader, writer, head = await handshake("/ws")
            writer.write(b"\x82\xff" + struct.pack(">Q", 2**63 - 1) + b"mask" + b"z" * 100_000)
            await writer.drain()  # handed on; then the client vanishes mid-frame (the
            writer.close()  # upstream may refuse it as too big or wait for the rest)

            # a client that opens a tunnel and never reads while the upstream floods
            rss_before = await rss(sc)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sc.port))
            sock.sendall(
                b"GET /flood/1000 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\n\r\n"
            )
            await asyncio.wait_for(up.flood_done.wait(), 15)  # the sidecar gave up on it
            sock.close()
            assert up.sent < 64 * MiB
            assert await rss(sc) - rss_before < 30 * MiB
            stalled = 'sidecar_connections_rejected_total{listener="proxy",reason="stalled_reader"}'
            assert await metric(sc, client, stalled) >= 1
            async with asyncio.timeout(5):
                while await metric(sc, client, "sidecar_websocket_active ") != 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            ended = 'sidecar_websocket_session_seconds_count{close="error",route="/flood/{id}"}'
            assert await metric(sc, client, ended) >= 1
            async with client.get(f"{sc.admin}/healthz") as r:
                assert r.status == 200
            async with client.ws_connect(f"{sc.base}/ws") as ws:  # and still tunnels
                await ws.send_str("fine")
                assert (await ws.receive(timeout=5)).data == "fine"
    finally:
        sc.terminate()
        assert await sc.wait() == 0


def masked_frame(opcode: int, payload: bytes, mask: bytes = b"abcd") -> bytes:
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


# --- the frame scanner alone ---


def frames(*specs: tuple[int, int, bool]) -> bytes:
    out = b""
    for opcode, length, masked in specs:
        if length < 126:
            head = bytes([0x80 | opcode, (0x80 if masked else 0) | length])
        elif length < 65536:
            head = bytes([0x80 | opcode, (0x80 if masked else 0) | 126]) + struct.pack(">H", length)
        else:
            head = bytes([0x80 | opcode, (0x80 if masked else 0) | 127]) + struct.pack(">Q", length)
        out += head + (b"mask" if masked else b"") + b"\x88" * length  # payload looks like Close
    return out


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split", [1, 2, 3, 7, 13, 1000])
def test_frame_scanner_finds_the_close_frame_across_any_split(masked, split):
    data = frames((0x1, 5, masked), (0x2, 200, masked), (0x9, 0, masked), (0x2, 70000, masked),
                  (0x0, 3, masked), (0x8, 2, masked))  # fmt: skip
    close_at = len(data) - (2 + (4 if masked else 0) + 2)
    starts = boundaries(data, masked)
    scanner = FrameScanner()
    seen_at = None
    for i in range(0, len(data), split):
        if split == 1:
            assert scanner.at_boundary == (i in starts)
        if scanner.feed(data[i : i + split]):
            seen_at = i
            break
    # seen in the chunk that completes its header (2 bytes, and the mask key if masked)
    assert seen_at is not None
    assert seen_at <= close_at + (5 if masked else 1) < seen_at + split


def boundaries(data: bytes, masked: bool) -> set[int]:
    out, pos = set(), 0
    while pos < len(data):
        out.add(pos)
        length = data[pos + 1] & 0x7F
        header = 2
        if length == 126:
            length, header = struct.unpack(">H", data[pos + 2 : pos + 4])[0], 4
        elif length == 127:
            length, header = struct.unpack(">Q", data[pos + 2 : pos + 10])[0], 10
        pos += header + (4 if masked else 0) + length
    return out


def test_frame_scanner_never_raises_on_garbage():
    scanner = FrameScanner()
    for _ in range(200):
        scanner.feed(os.urandom(997))
    assert not scanner.feed(b"")


@pytest.mark.slow
async def test_an_idle_session_outlives_every_client_timeout(ws_upstream, make_sidecar):
    """Idle WebSocket sessions are the upstream's business: the sidecar's head,
    keep-alive and idle timeouts (1 s each here) never end one that sends nothing."""
    _, url = ws_upstream
    sc = await make_sidecar(url, client_header_timeout_s=1, keepalive_timeout_s=1,
                            client_idle_timeout_s=1)  # fmt: skip
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"http://127.0.0.1:{sc.proxy_port}/ws") as ws,
    ):
        await asyncio.sleep(3)  # the idle time under test: three of each timeout
        await ws.send_str("after the silence")
        assert (await ws.receive(timeout=5)).data == "after the silence"
    assert sessions_ended(sc, "/ws", "error") == 0


async def test_sessions_count_against_the_connection_cap(ws_upstream, make_sidecar):
    """An open session holds its client connection: with SIDECAR_MAX_CONNECTIONS=2 and
    two sessions open, a third connection is refused until one session ends."""
    _, url = ws_upstream
    sc = await make_sidecar(url, max_connections=2)
    base = f"http://127.0.0.1:{sc.proxy_port}"
    async with aiohttp.ClientSession() as client:
        first = await client.ws_connect(f"{base}/ws")
        second = await client.ws_connect(f"{base}/ws")
        with pytest.raises(aiohttp.ClientConnectionError):  # closed at once, unserved
            async with client.get(f"{base}/ws-plain", timeout=aiohttp.ClientTimeout(total=5)):
                pass
        await first.close()
        await all_closed_but(sc, 1)
        async with client.ws_connect(f"{base}/ws") as third:
            await third.send_str("room again")
            assert (await third.receive(timeout=5)).data == "room again"
        await second.close()


async def all_closed_but(sc: Sidecar, n: int) -> None:
    async with asyncio.timeout(10):
        while sample(sc, "sidecar_websocket_active") > n:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
