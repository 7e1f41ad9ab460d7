"""Raw bytes to a listener: for requests an HTTP client library refuses to send."""

from __future__ import annotations

import asyncio


async def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` as it is; return all the server answers until it closes (send
    ``Connection: close``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()
