"""The timing record: what the proxy knows about one finished request.

The proxy builds one `TimingRecord` per request and hands it, synchronously, to every
registered `Observer`. Observers must be O(1) and never do I/O: anything slow goes
through a bounded queue to a background task.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class TimingRecord(NamedTuple):
    """Immutable; times are `time.perf_counter()` seconds, `wall` is `time.time()`."""

    start: float
    headers_at: float | None  # upstream response headers arrived
    first_byte_at: float | None  # first response body byte sent to the client
    end: float
    wall: float  # wall-clock time at start, for events
    method: str
    route: str
    status: int
    bytes_in: int
    bytes_out: int
    stream: bool  # response was text/event-stream
    request_id: str
    trace_id: str | None
    error: str | None  # None, "connect", "timeout", "reset", "client_disconnect"

    @property
    def latency(self) -> float:
        """What percentiles use: time to first body byte for streams, else the total."""
        if self.stream and self.first_byte_at is not None:
            return self.first_byte_at - self.start
        return self.end - self.start

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def upstream_wait(self) -> float:
        """Time spent waiting on the upstream for its headers (0 if none came)."""
        return 0.0 if self.headers_at is None else self.headers_at - self.start


class Observer(Protocol):
    def observe(self, record: TimingRecord) -> None:
        """Called on the event loop for every finished request. O(1), no I/O."""
        ...


UPSTREAM_ERRORS = ("connect", "timeout", "reset")
CLIENT_DISCONNECT = "client_disconnect"
