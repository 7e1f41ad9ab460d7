"""Redis Stream sink: `XADD <stream> MAXLEN ~ <maxlen> * field value ...`.

redis-py retries on its own by default; here it must not (a refused connection would
then take seconds per attempt), so retries are ours: no client retries, short socket
timeouts, and the queue's capped backoff. After an ambiguous failure (a timeout: the
command may have been applied) the stream's tail is checked for the batch's event ids
before resending, so a hung-then-resumed Redis does not get duplicates.

Each event is encoded to bytes before it joins the pipeline: one that cannot be
encoded (a lone surrogate from a non-UTF-8 header byte) is given up on, and the rest
of the batch is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, TimeoutError

from ..events import Event
from ..metrics import Metrics
from .queue import QueuedSink, RetryLater


class RedisStreamSink(QueuedSink):
    batch_size = 100

    def __init__(
        self, url: str, *, stream: str, maxlen: int, capacity: int, metrics: Metrics
    ) -> None:
        super().__init__("redis", capacity, metrics)
        self._stream = stream
        self._maxlen = maxlen
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=True,
        )
        self._ambiguous = False

    async def deliver(self, batch: Sequence[Event]) -> int:
        try:
            if self._ambiguous:
                already = await self._already_written(batch)
                self._ambiguous = False
                if already:
                    return already
            pipe = self.client.pipeline(transaction=False)
            for event in batch:
                try:
                    fields: dict[Any, Any] = {
                        k.encode(): v.encode() for k, v in event.fields().items()
                    }
                except UnicodeEncodeError as exc:
                    self.give_up(event, str(exc))
                    continue
                pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
            if len(pipe):
                await pipe.execute()
            return len(batch)
        except TimeoutError as exc:
            self._ambiguous = True
            raise RetryLater(f"redis timed out: {exc}") from None
        except (RedisError, OSError) as exc:
            # a connection dropped mid-pipeline may also have applied a prefix
            self._ambiguous = True
            raise RetryLater(f"redis unavailable: {exc}") from None

    async def _already_written(self, batch: Sequence[Event]) -> int:
        """How many events at the head of ``batch`` the stream already holds."""
        tail = await self.client.xrevrange(self._stream, count=len(batch) + 16) or []
        ids = {fields.get("event_id") for _, fields in tail if fields}
        n = 0
        while n < len(batch) and batch[n].event_id in ids:
            n += 1
        return n

    async def aclose(self) -> None:
        await self.client.aclose()
