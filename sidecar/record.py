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
    sent_at: float | None  # request handed to the upstream connection
    headers_at: float | None  # upstream response headers arrived
    upstream_end: float | None  # upstream response body fully read
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
    # What percentiles, breaches and the duration histogram use: time to first body
    # byte for streams, else the total. Computed once by `latency_of`.
    latency: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def upstream_header_wait(self) -> float | None:
        """From handing the request over to the upstream's response headers."""
        if self.headers_at is None or self.sent_at is None:
            return None
        return self.headers_at - self.sent_at

    @property
    def overhead(self) -> float | None:
        """Time the sidecar itself added: the total minus the time spent waiting on the
        upstream (from handing the request over until its body was fully read)."""
        if self.sent_at is None or self.upstream_end is None:
            return None
        return max(0.0, (self.sent_at - self.start) + (self.end - self.upstream_end))


def latency_of(start: float, first_byte_at: float | None, end: float, stream: bool) -> float:
    if stream and first_byte_at is not None:
        return first_byte_at - start
    return end - start


class Observer(Protocol):
    def observe(self, record: TimingRecord) -> None:
        """Called on the event loop for every finished request. O(1), no I/O."""
        ...


UPSTREAM_ERRORS = ("connect", "timeout", "reset")
CLIENT_DISCONNECT = "client_disconnect"
