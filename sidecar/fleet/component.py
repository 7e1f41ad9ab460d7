"""The fleet component (``SIDECAR_FLEET``): one async context manager that shares this
sidecar's histograms, keeps the fleet view, holds or waits for the evaluator lease,
and (``SIDECAR_BREACH_SCOPE`` fleet|both) judges the fleet rules while it holds it.

Nothing here runs on the request path: `Percentiles.tick` hands over the second it
closed, and one background task does the rest, one step after each tick: a share
round trip (batches + lease renewal); then, for the lease holder only, a view refresh
and, every ``SIDECAR_EVAL_INTERVAL_S``, the fleet rules. Redis down or slow costs that
task time, never a proxied request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from prometheus_client import Counter

from ..breach import BreachPolicy
from ..config import Settings
from ..events import EventBus
from ..ids import new_id
from ..metrics import Metrics
from ..percentiles import Key, Percentiles
from ..window import SubWindow
from .breach import FleetBreaches, active_json
from .gauge import FleetQuantileCollector
from .layout import SETTLE_S
from .lease import LeaseHolder
from .share import Sharer
from .store import FleetError, FleetStore, RedisFleetStore
from .view import FleetView

log = logging.getLogger("sidecar.fleet")
STEP_FALLBACK_S = 1.5  # without ticks (a test's manual clock) the lease is still renewed
WARN_EVERY_S = 60.0


class Fleet:
    def __init__(
        self,
        settings: Settings,
        policy: BreachPolicy,
        percentiles: Percentiles,
        bus: EventBus,
        metrics: Metrics,
        *,
        store: FleetStore | None = None,
    ) -> None:
        s = settings
        self.name = s.fleet
        self.incarnation = f"{s.instance}/{new_id()[:8]}"
        self.store: FleetStore = store or RedisFleetStore(
            s.redis_url, s.fleet, s.instance, self.incarnation, s.windows_s
        )
        self.sharer = Sharer(self.store, keep_s=max(s.windows_s) + SETTLE_S)
        self.view = FleetView(self.store, s.fleet, s.windows_s)
        self.lease = LeaseHolder()
        self.breaches = (
            FleetBreaches(
                policy, s.fleet, s.redis_stream, s.redis_maxlen, self.store, self.view, bus
            )
            if s.breach_scope in ("fleet", "both")
            else None
        )
        self._eval_interval = policy.eval_interval_s
        self._next_eval = 0.0
        self._ticked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._breaches_read: tuple[float, list[dict[str, Any]]] | None = None
        self._warned_at = 0.0
        percentiles.tick_hooks.append(self._on_tick)
        metrics.registry.register(
            FleetQuantileCollector(self.view, lambda: self.lease.current is not None)
        )
        self._evaluations = Counter(
            "sidecar_fleet_evaluations_total",
            "Fleet rule evaluations this sidecar ran as the fleet's lease holder (the one "
            "evaluating sidecar's counter grows every SIDECAR_EVAL_INTERVAL_S).",
            registry=metrics.registry,
        )

    def _on_tick(self, closed: Mapping[Key, SubWindow]) -> None:
        self.sharer.on_tick(closed)
        self._ticked.set()

    async def __aenter__(self) -> Fleet:
        self._task = asyncio.create_task(self._run(), name="fleet")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # hand over: the last seconds' data, and the lease, so another takes over at once
        with contextlib.suppress(FleetError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.sharer.flush(want_lease=False)
        await self.store.aclose()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STEP_FALLBACK_S):
                    await self._ticked.wait()
            self._ticked.clear()
            try:
                await self.step()
            except FleetError as exc:
                self._trouble(exc)
            except Exception:  # keep sharing: one bad step must not end the task
                log.exception("fleet step failed")

    async def step(self) -> None:
        """Share (and renew the lease); as the holder, refresh and judge."""
        loop = asyncio.get_running_loop()
        sent = time.monotonic()
        lease = await self.sharer.flush(want_lease=True)
        if self.lease.update(lease, sent):
            log.info(
                "fleet lease acquired", extra={"fleet": self.name, "token": lease and lease.token}
            )
            self._next_eval = loop.time()  # judge at once: the fleet may be mid-breach
        self._recovered()
        current = self.lease.current
        if current is None:
            return
        await self.view.refresh()
        if self.breaches is not None and loop.time() >= self._next_eval:
            self._next_eval = loop.time() + self._eval_interval
            await self.breaches.evaluate(current)
            self._evaluations.inc()

    async def breaches_json(self) -> dict[str, Any]:
        """`GET /breaches?scope=fleet`: the fleet's open breaches as the store holds
        them (whichever sidecar raised them), read at most once a second however often
        asked; Redis unreadable: the last ones read, with their age in ``stale_s``
        (None: never read)."""
        read = self._breaches_read
        if read is None or time.monotonic() - read[0] >= 1.0:  # at most one read a second
            try:
                async with asyncio.timeout(1.5):
                    states = await self.store.rule_states()
            except (FleetError, TimeoutError):
                pass
            else:
                self._breaches_read = (time.monotonic(), active_json(states))
        if self._breaches_read is None:
            return {"fleet": self.name, "active": [], "stale_s": None}
        read_at, active = self._breaches_read
        stale_s = round(time.monotonic() - read_at, 1)
        return {"fleet": self.name, "active": active, "stale_s": stale_s}

    async def percentiles_json(self) -> dict[str, Any]:
        """`GET /percentiles?scope=fleet`: refreshed unless fresh; the last state (with
        its age in ``stale_s``) when Redis cannot be read."""
        await self.view.fresh()
        return self.view.as_json()

    def _trouble(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "fleet: redis unavailable, the fleet view is getting stale",
                extra={"fleet": self.name, "error": str(exc)[:200], "queued": self.sharer.pending},
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info(
                "fleet: redis reachable again",
                extra={
                    "fleet": self.name,
                    "after_s": round(time.monotonic() - self._failing_since, 1),
                },
            )
            self._failing_since = None
            self._warned_at = 0.0
