"""Fleet view at scale: N simulated sidecars x R routes sharing through a real Redis.

Each simulated sidecar is the real sharing code (`sidecar.fleet.share.Sharer` over
`RedisFleetStore`): once a second, on its own phase, it closes a second of traffic
(Poisson arrivals at ``--rps``, routes Zipf-distributed, lognormal latencies per route,
every request counted under its route and ``*`` as the sidecar does) and sends it in
one round trip, renewing or contending for the lease. One of them, the lease holder,
refreshes its fleet view every second as a real one does. At the end: Redis's keys,
memory (``INFO memory`` and ``MEMORY USAGE`` of every fleet key), commands and bytes
per second (``INFO stats``), Redis CPU, the share round trip, and the fleet query time
(a cold reader reading whole windows, and the holder's per-second refresh).

    python bench/fleet_sim.py [--sidecars 200] [--routes 100] [--rps 100]
                              [--windows 60,300] [--duration 330] [--redis-url URL]

Without ``--redis-url`` it starts ``redis-server`` from PATH on a Unix socket in a
temporary directory (removed at exit). ``--duration`` should exceed the longest window
(plus ~10 s) for steady-state memory; shorter runs report what they reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from sidecar.demo.fleet import local_redis
from sidecar.fleet.layout import slot_of
from sidecar.fleet.share import Sharer
from sidecar.fleet.store import FleetError, RedisFleetStore
from sidecar.fleet.view import FleetView
from sidecar.percentiles import Key
from sidecar.routes import ALL
from sidecar.sketch import bucket_of, rank_of
from sidecar.window import SubWindow

FLEET = "sim"


class Traffic:
    """One sidecar's requests: Zipf over routes, lognormal latency per route."""

    def __init__(self, routes: list[Key], rps: float, rng: random.Random) -> None:
        self.routes = routes
        self.rps = rps
        self.rng = rng
        weights = [1 / (i + 1) for i in range(len(routes))]
        self.cum = list(itertools.accumulate(weights))
        self.mu = [math.log(0.02 * 1.03**i) for i in range(len(routes))]

    def second(self) -> tuple[dict[Key, SubWindow], list[float]]:
        """One second of traffic: the sub-windows, and the unary latencies (exact)."""
        rng = self.rng
        n = _poisson(rng, self.rps)
        subs: dict[Key, SubWindow] = {}
        unary: list[float] = []
        for i in rng.choices(range(len(self.routes)), cum_weights=self.cum, k=n):
            seconds = rng.lognormvariate(self.mu[i], 0.6)
            b = bucket_of(seconds)
            route, stream = self.routes[i]
            if not stream:
                unary.append(seconds)
            for key in ((route, stream), (ALL, stream)):
                sub = subs.get(key)
                if sub is None:
                    sub = subs[key] = SubWindow()
                sub.add(b, seconds)
        return subs, unary


def _poisson(rng: random.Random, lam: float) -> int:
    return max(0, round(rng.gauss(lam, math.sqrt(lam)))) if lam > 30 else _knuth(rng, lam)


def _knuth(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class SimSidecar:
    def __init__(self, i: int, url: str, windows: list[int], routes: list[Key], rps: float
                 ) -> None:  # fmt: skip
        self.name = f"pod-{i:03d}"
        self.store = RedisFleetStore(url, FLEET, self.name, f"{self.name}/sim", windows)
        self.sharer = Sharer(self.store, keep_s=max(windows) + 3)
        self.traffic = Traffic(routes, rps, random.Random(i))
        self.view = FleetView(self.store, FLEET, windows)
        self.trips: list[float] = []
        self.refreshes: list[float] = []
        self.errors = 0
        self.batches = 0
        self.holder = False
        self.exact: list[tuple[float, list[float]]] = []  # (the data's time, latencies)

    async def run(self, until: float) -> None:
        await asyncio.sleep(random.random())  # each sidecar ticks on its own phase
        next_at = time.monotonic() + 1
        while time.monotonic() < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1
            subs, unary = self.traffic.second()
            now = time.time()
            self.sharer.on_tick(subs, now)
            self.exact.append((now - 0.5, unary))
            t0 = time.perf_counter()
            queued = self.sharer.pending
            try:
                lease = await self.sharer.flush(want_lease=True)
            except FleetError:
                self.errors += 1
                continue
            self.batches += queued - self.sharer.pending
            self.trips.append(time.perf_counter() - t0)
            self.holder = lease is not None
            if self.holder:  # the lease holder refreshes its view every second
                t0 = time.perf_counter()
                try:
                    await self.view.refresh()
                except FleetError:
                    self.errors += 1
                    continue
                self.refreshes.append(time.perf_counter() - t0)


async def info(client: aioredis.Redis) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in ("stats", "memory", "cpu", "keyspace"):
        doc.update(await client.info(section))
    return doc


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1)))] if s else math.nan


async def simulate(args: argparse.Namespace, url: str) -> dict[str, Any]:
    windows = sorted(int(w) for w in args.windows.split(","))
    n_stream = max(1, args.routes // 10)
    routes: list[Key] = [(f"/v1/route-{i:03d}/{{id}}", i < n_stream) for i in range(args.routes)]
    client = aioredis.Redis.from_url(url, decode_responses=True)
    await client.flushall()
    base = await info(client)
    sidecars = [SimSidecar(i, url, windows, routes, args.rps) for i in range(args.sidecars)]
    t0 = time.monotonic()
    until = t0 + args.duration
    warm_at = t0 + min(args.duration / 2, 30.0)  # rates measured after the warm-up
    runs = [asyncio.create_task(sc.run(until)) for sc in sidecars]
    await asyncio.sleep(warm_at - time.monotonic())
    warm = await info(client)
    warm_t = time.monotonic()
    warm_batches = sum(sc.batches for sc in sidecars)
    await asyncio.gather(*runs)
    end = await info(client)
    span = time.monotonic() - warm_t
    batches = sum(sc.batches for sc in sidecars) - warm_batches

    keys = [k async for k in client.scan_iter(match=f"sidecar:fleet:{{{FLEET}}}:*", count=1000)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    usage = [u or 0 for u in await pipe.execute()]
    by_kind: dict[str, list[int]] = {}
    for k, u in zip(keys, usage, strict=True):
        part = k.split(":", 3)[3]
        kind = "slot data" if part.startswith("w") and not part.endswith(("idx", "late")) else (
            "slot index" if part.endswith("idx") else part.split(":")[0])  # fmt: skip
        by_kind.setdefault(kind, []).append(u)

    # a cold reader (a sidecar answering /percentiles?scope=fleet for the first time, or
    # the CLI): reads whole windows
    cold_store = RedisFleetStore(url, FLEET, "reader", "reader/sim", windows)
    cold = FleetView(cold_store, FLEET, windows)
    t = time.perf_counter()
    await cold.refresh()
    cold_s = time.perf_counter() - t
    snap = cold.snapshot()
    first = cold.windows[0]
    lo, hi = min(first.slots), max(first.slots)
    t = time.perf_counter()
    doc = cold.as_json()
    json_s = time.perf_counter() - t
    await asyncio.sleep(1.0)
    t = time.perf_counter()
    await cold.refresh()
    warm_refresh_s = time.perf_counter() - t
    await cold_store.aclose()

    # accuracy: the fleet's `*` (unary) against the exact latencies of every request the
    # simulated sidecars attributed to the slots the cold reader's shortest window holds
    exact = sorted(
        v
        for sc in sidecars
        for at, values in sc.exact
        if lo <= slot_of(at, first.window_s) <= hi
        for v in values
    )
    fleet_star = snap.stats.get((ALL, False), {}).get(first.window_s)
    accuracy = {}
    if exact and fleet_star is not None and fleet_star.count:
        for q in (0.5, 0.95, 0.99, 0.999):
            e = exact[rank_of(q, len(exact))]
            accuracy[f"p{q * 100:g}"] = {
                "fleet_ms": round(fleet_star.value(q) * 1000, 3),
                "exact_ms": round(e * 1000, 3),
                "error_pct": round((fleet_star.value(q) / e - 1) * 100, 3),
            }
    trips = [x for sc in sidecars for x in sc.trips]
    refreshes = [x for sc in sidecars for x in sc.refreshes]
    for sc in sidecars:
        await sc.store.aclose()
    await client.aclose()

    def rate(field: str) -> float:
        return (float(end[field]) - float(warm[field])) / span

    cpu = (
        float(end["used_cpu_sys"]) + float(end["used_cpu_user"])
        - float(warm["used_cpu_sys"]) - float(warm["used_cpu_user"])
    ) / span  # fmt: skip
    star = snap.stats.get((ALL, False), {})
    return {
        "sidecars": args.sidecars,
        "routes": args.routes,
        "rps_per_sidecar": args.rps,
        "windows_s": windows,
        "duration_s": args.duration,
        "redis_keys": int(end.get(f"db{0}", {}).get("keys", len(keys))),
        "fleet_keys": len(keys),
        "keys_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "memory_usage_bytes_by_kind": {k: sum(v) for k, v in sorted(by_kind.items())},
        "memory_usage_bytes_total": sum(usage),
        "used_memory_bytes": int(end["used_memory"]) - int(base["used_memory"]),
        "used_memory_human": end["used_memory_human"],
        # a simulated sidecar that falls behind (this one process runs them all) sends
        # fewer batches than one a second: the per-batch figures do not depend on that
        "batches_per_s_per_sidecar": batches / span / args.sidecars,
        "commands_per_batch": rate("total_commands_processed") * span / max(1, batches),
        "net_in_bytes_per_batch": rate("total_net_input_bytes") * span / max(1, batches),
        "redis_cpu_ms_per_batch": cpu * span * 1000 / max(1, batches),
        "commands_per_s": rate("total_commands_processed"),
        "commands_per_s_per_sidecar": rate("total_commands_processed") / args.sidecars,
        "net_in_bytes_per_s_per_sidecar": rate("total_net_input_bytes") / args.sidecars,
        "net_out_bytes_per_s_per_sidecar": rate("total_net_output_bytes") / args.sidecars,
        "redis_cpu_share_of_a_core": cpu,
        "share_round_trip_ms_p50_p99": [pct(trips, 0.5) * 1000, pct(trips, 0.99) * 1000],
        "share_errors": sum(sc.errors for sc in sidecars),
        "holder_refresh_ms_p50_p99": [pct(refreshes, 0.5) * 1000, pct(refreshes, 0.99) * 1000],
        "cold_read_whole_windows_ms": cold_s * 1000,
        "warm_refresh_ms": warm_refresh_s * 1000,
        "snapshot_json_ms": json_s * 1000,
        "fleet_routes_seen": len(doc["routes"]) + len(doc["streams"]),
        "instances_seen": len(cold.instances),
        "fleet_requests_in_shortest_window": star.get(windows[0]).count if star else 0,
        "exact_requests_in_shortest_window": len(exact),
        "accuracy_vs_exact_union": accuracy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", type=int, default=200)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--rps", type=float, default=100, help="requests/s per sidecar")
    parser.add_argument("--windows", default="60,300")
    parser.add_argument("--duration", type=float, default=330)
    parser.add_argument("--redis-url")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(local_redis())
        if url is None:
            sys.exit("redis-server not found: apt-get install redis-server (or pass --redis-url)")
        result = asyncio.run(simulate(args, url))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if isinstance(v, float):
                v = round(v, 3)
            elif isinstance(v, list):
                v = [round(x, 2) if isinstance(x, float) else x for x in v]
            print(f"{k:<40} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
