"""The timing record: what the proxy knows about one finished request.

The proxy builds one `TimingRecord` per request and hands it, synchronously, to every
registered `Observer`. Observers must be O(1) and never do I/O: anything slow goes
through a bounded queue to a background task.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class TimingRecord(NamedTuple):
    """Immutable; times are `time.perf_counter()` seconds, `wall` is `time.time()`."""

    start: float  # the request's head was read (as early as the process sees it)
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
    error: str | None  # None, "connect", "timeout", "reset", "client_disconnect",
    # "client_timeout", or a refusal ("bad_request", "method_not_allowed", ...)
    # What percentiles, breaches and the duration histogram use: time to first body
    # byte for streams, else the total. Computed once by `latency_of`.
    latency: float
    # Latency anatomy (sidecar/anatomy/): streams only, the first output event's arrival
    # (the first body byte when none can be told apart); time per output token, or
    # per output chunk without usage; tokens when the answer reported usage.
    first_token_at: float | None = None
    time_per_token: float | None = None
    output_tokens: int | None = None
    input_tokens: int | None = None


# The record's four anatomy fields, in order; what a request without them carries
AnatomyFields = tuple[float | None, float | None, int | None, int | None]
NO_ANATOMY: AnatomyFields = (None, None, None, None)


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
CLIENT_TIMEOUT = "client_timeout"
