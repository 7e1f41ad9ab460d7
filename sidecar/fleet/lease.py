"""The evaluator lease, as this sidecar sees it.

The lease itself lives in the store (``SET NX PX`` semantics in a script, renewed with
every share round trip; each new holder gets a larger fencing token that every breach
state change is checked against). Locally it is held from the moment a round trip that
renewed it was *sent* until ``LEASE_TTL_S - MARGIN_S`` later: Redis started its timer
after that, so this sidecar stops acting as the holder before Redis lets another take
over.
"""

from __future__ import annotations

import time

from .layout import LEASE_TTL_S
from .store import Lease

MARGIN_S = 0.5


class LeaseHolder:
    def __init__(self) -> None:
        self._lease: Lease | None = None
        self._until = 0.0
        self.acquired = 0  # times this sidecar became the holder

    def update(self, lease: Lease | None, sent_at: float) -> bool:
        """Record a round trip's answer; True when the lease was newly acquired."""
        new = lease is not None and (self.current is None or self.current.token != lease.token)
        self._lease = lease
        self._until = sent_at + LEASE_TTL_S - MARGIN_S if lease is not None else 0.0
        if new:
            self.acquired += 1
        return new

    @property
    def current(self) -> Lease | None:
        if self._lease is not None and time.monotonic() < self._until:
            return self._lease
        return None
