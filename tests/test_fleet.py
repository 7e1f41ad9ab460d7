"""The fleet view (issue 11): real sidecar processes sharing through a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from sidecar.sketch import bucket_of

from .binaries import start_with_retry
from .exact import exact, max_bound_ms, sandwich_ms
from .process import SidecarProcess, spawn_sidecar
from .upstream import burst

ROUTE = "/sleep/{id}"
QS = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p95_ms", 0.95), ("p99_ms", 0.99))


@contextlib.asynccontextmanager
async def fleet_of(
    n: int, upstream: str, redis_url: str, env: Mapping[str, str] | None = None,
    pod_env: Mapping[int, Mapping[str, str]] | None = None,
) -> AsyncIterator[list[SidecarProcess]]:  # fmt: skip
    """``n`` sidecar processes named pod-0..pod-N-1 in fleet ``t`` (windows of 5 s unless
    told), stopped at the end (SIGTERM, then SIGKILL)."""
    settings = {
        "SIDECAR_FLEET": "t", "SIDECAR_REDIS_URL": redis_url, "SIDECAR_WINDOWS_S": "5",
        "SIDECAR_EVAL_INTERVAL_S": "1", "SIDECAR_SHUTDOWN_GRACE_S": "0.5", **(env or {}),
    }  # fmt: skip
    pods = await asyncio.gather(*(
        spawn_sidecar(upstream, SIDECAR_INSTANCE=f"pod-{i}", **settings,
                      **(pod_env or {}).get(i, {}))
        for i in range(n)
    ))  # fmt: skip
    try:
        yield list(pods)
    finally:
        for p in pods:
            if p.proc.returncode is None:
                p.terminate()
        for p in pods:
            try:
                await p.wait(15)
            except TimeoutError:
                p.kill()
                await p.wait()


async def get_json(client: aiohttp.ClientSession, url: str) -> dict:
    async with client.get(url) as r:
        assert r.status == 200, await r.text()
        doc: dict = await r.json()
        return doc


async def fleet_doc(client, pod: SidecarProcess) -> dict:
    return await get_json(client, f"{pod.admin}/percentiles?scope=fleet")


async def until(probe, timeout: float = 20.0, interval: float = 0.2):
    """Poll ``probe`` (an external system that cannot notify us) until it returns a
    truthy value; return that value."""
    async with asyncio.timeout(timeout):
        while True:
            got = await probe()
            if got:
                return got
            await asyncio.sleep(interval)


class Driver:
    """Sends ``delays_ms`` through every pod of ``pods``, round after round, until stopped;
    ``retarget`` changes both, returning once no round of the old targets is in flight."""

    def __init__(self, client, pods: Sequence[SidecarProcess], delays_ms: Sequence[int]):
        self.client, self.pods, self.delays_ms = client, list(pods), list(delays_ms)
        self.rounds = 0
        self._stop = asyncio.Event()
        self._round_done = asyncio.Condition()

    async def run(self) -> None:
        while not self._stop.is_set():
            pods, delays = self.pods, self.delays_ms
            await asyncio.gather(*(burst(self.client, p.base, delays) for p in pods))
            async with self._round_done:
                self.rounds += 1
                self._round_done.notify_all()

    async def retarget(self, pods: Sequence[SidecarProcess], delays_ms: Sequence[int]) -> None:
        self.pods, self.delays_ms = list(pods), list(delays_ms)
        async with self._round_done:  # the round in flight may use the old targets
            now = self.rounds
            await self._round_done.wait_for(lambda: self.rounds > now)

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def driving(client, pods: Sequence[SidecarProcess], delays_ms: Sequence[int]):
    driver = Driver(client, pods, delays_ms)
    task = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        driver.stop()
        await task


async def evaluations(client, pods: Sequence[SidecarProcess]) -> float:
    """Fleet rule evaluations the living pods ran so far (only the holder counts)."""
    total = 0.0
    for pod in pods:
        if pod.proc.returncode is None:
            async with client.get(f"{pod.admin}/metrics") as r:
                text = await r.text()
            for fam in text_string_to_metric_families(text):
                if fam.name == "sidecar_fleet_evaluations":
                    total += sum(x.value for x in fam.samples if x.name.endswith("_total"))
    return total


async def more_evaluations(client, pods: Sequence[SidecarProcess], n: int) -> None:
    """Wait for ``n`` more fleet evaluation rounds: a duplicate event, or a breach
    raised again, would have come in them (a negative proved by state, not by sleep)."""
    start = await evaluations(client, pods)

    async def done() -> bool:
        return await evaluations(client, pods) >= start + n

    await until(done, timeout=15)


async def exporters(client, pods: Sequence[SidecarProcess]) -> list[str]:
    """Which pods export the fleet gauge now (by instance name)."""
    out = []
    for i, pod in enumerate(pods):
        if pod.proc.returncode is not None:
            continue
        try:
            async with client.get(f"{pod.admin}/metrics") as r:
                text = await r.text()
        except aiohttp.ClientError:
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name == "sidecar_fleet_latency_quantile_seconds" and fam.samples:
                out.append(f"pod-{i}")
    return out


async def stream(url: str) -> list[dict[str, str]]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        entries = await client.xrange("sidecar:events") or []
        return [{str(k): str(v) for k, v in (f or {}).items()} for _, f in entries]
    finally:
        await client.aclose()


def count(doc: dict, route: str = ROUTE, window: str = "5") -> int:
    return int(doc["routes"].get(route, {}).get(window, {}).get("count", 0))


@pytest.mark.slow
@pytest.mark.tools
async def test_fleet_percentiles_are_those_of_the_union(upstream, redis_server):
    up, url = upstream
    rng = random.Random(11)
    # three pods, three distributions: fast, medium, and one with a slow tail
    plans = [
        [rng.choice((5, 10, 15, 20)) for _ in range(150)],
        [rng.choice((40, 50, 60, 70, 80)) for _ in range(150)],
        [rng.choice((10,) * 8 + (150, 250)) for _ in range(150)],
    ]
    async with (
        fleet_of(3, url, redis_server.url, env={"SIDECAR_WINDOWS_S": "10,60"}) as pods,
        aiohttp.ClientSession() as client,
    ):
        times = await asyncio.gather(*(burst(client, p.base, plan)
                                       for p, plan in zip(pods, plans, strict=True)))  # fmt: skip
        client_times = [t for ts in times for t in ts]
        total = len(client_times)

        async def ticked():  # each pod's own window has the last second once it ticks
            docs = [await get_json(client, f"{p.admin}/percentiles") for p in pods]
            return docs if sum(count(d, window="10") for d in docs) == total else None

        local = await until(ticked, timeout=5)

        def whole(doc: dict) -> dict | None:
            return doc if all(count(doc, window=w) == total for w in ("10", "60")) else None

        async def complete(pod: SidecarProcess) -> dict | None:
            return whole(await fleet_doc(client, pod))

        t0 = time.monotonic()
        doc = await until(lambda: complete(pods[1]), timeout=9)
        print(f"fleet view complete {time.monotonic() - t0:.1f} s after the last response")
        docs = [doc]
        for p in (pods[0], pods[2], pods[2]):  # a first (whole-window) read, then a fresh one
            t1 = time.perf_counter()
            got = await fleet_doc(client, p)
            print(f"GET /percentiles?scope=fleet {(time.perf_counter() - t1) * 1000:.1f} ms")
            # a view refreshed up to a second ago (the evaluator's) may still miss the
            # newest slot: it catches up at its next refresh
            docs.append(whole(got) or await until(lambda p=p: complete(p), timeout=3))
        mets = []
        for d in docs:
            assert d["fleet"] == "t" and d["instances"] == ["pod-0", "pod-1", "pod-2"]
            assert d["stale_s"] is not None and d["stale_s"] < 2.5
            assert d["windows_s"] == [10, 60]
            for window in ("10", "60"):
                stats = d["routes"][ROUTE][window]
                assert stats["count"] == total  # the counts add up exactly
                assert d["routes"]["*"][window]["count"] == total
                for key, q in QS:
                    low, high = sandwich_ms(up.durations, client_times, q)
                    assert low <= stats[key] <= high, (window, key, low, stats[key], high)
                # the sidecar's clock stops when its handler ends, which can be a little
                # after the client read the last byte: the quantiles' 1% again
                assert stats["max_ms"] <= max_bound_ms(client_times)
            mets.append({k: d["routes"][ROUTE]["10"][k] for k, _ in QS})
        assert all(m == mets[0] for m in mets)  # every pod sees the same fleet
        for key, q in QS:
            exact_ms = exact(client_times, q) * 1000
            low_ms = exact(up.durations, q) * 1000
            print(f"fleet {key} {mets[0][key]:.2f} ms; exact of the union: upstream side "
                  f"{low_ms:.2f} ms, client side {exact_ms:.2f} ms")  # fmt: skip
        # exactly one pod exports the fleet gauge
        assert len(await exporters(client, pods)) == 1
        print("per-pod p95 ms:", [d["routes"][ROUTE]["10"]["p95_ms"] for d in local])


@pytest.mark.slow
@pytest.mark.tools
async def test_one_event_per_fleet_state_change_and_failover(upstream, redis_server):
    """Three pods breach together: one breach event per rule for the fleet (not three).
    The evaluating pod is killed mid-breach: another takes over, does not raise the
    breach again, and the resolve comes exactly once."""
    _, url = upstream
    rules = {"SIDECAR_P95_THRESHOLD_MS": "100", "SIDECAR_P99_THRESHOLD_MS": "120",
             "SIDECAR_MIN_SAMPLES": "10", "SIDECAR_BREACH_SCOPE": "fleet",
             "SIDECAR_EVAL_INTERVAL_S": "1"}  # fmt: skip
    async with (
        fleet_of(3, url, redis_server.url, env=rules) as pods,
        aiohttp.ClientSession() as client,
    ):
        # slow traffic until the fail-over is done: the breach stays live however long
        # this machine takes (an empty window would resolve it); the new holder must take
        # over its state, not raise it again
        async with driving(client, pods, [150] * 4) as driver:

            async def breaches():
                fleet = [f for f in await stream(redis_server.url) if f["type"] == "breach"]
                return fleet if len(fleet) >= 4 else None

            raised = await until(breaches, timeout=15)
            holder = await until(lambda: exporters(client, pods))
            assert len(holder) == 1
            victim = pods[int(holder[0].split("-")[1])]
            survivors = [p for p in pods if p is not victim]
            # every pod, not only the one that raised them, shows the fleet's breaches
            doc = await get_json(client, f"{survivors[0].admin}/breaches?scope=fleet")
            assert doc["fleet"] == "t" and doc["stale_s"] is not None and doc["stale_s"] < 2
            assert {(a["route"], a["quantile"], a["severity"]) for a in doc["active"]} == {
                (ROUTE, "p95", "warning"), (ROUTE, "p99", "critical"),
                ("*", "p95", "warning"), ("*", "p99", "critical"),
            }  # fmt: skip
            assert all(a["instances"] in (2, 3) and a["value_ms"] > 100 for a in doc["active"])
            own = await get_json(client, f"{survivors[0].admin}/breaches")
            assert own["active"] == []  # the instance rules are off (scope fleet)
            await driver.retarget(survivors, [150] * 4)
            victim.kill()
            killed_at = time.monotonic()
            await victim.wait()

            async def new_holder():
                return await exporters(client, survivors)

            await until(new_holder, timeout=15, interval=0.1)
            failover_s = time.monotonic() - killed_at
            print(f"evaluator fail-over: a survivor exports the fleet gauge {failover_s:.1f} s "
                  "after the holder was killed")  # fmt: skip
            assert failover_s < 6

            async def resolved():
                fleet = [f for f in await stream(redis_server.url) if f["type"] == "resolved"]
                return fleet if len(fleet) >= 4 else None

            await driver.retarget(survivors, [5] * 10)
            await until(resolved, timeout=30)
            await more_evaluations(client, survivors, 3)
            doc = await get_json(client, f"{survivors[1].admin}/breaches?scope=fleet")
            assert doc["active"] == []
        entries = await stream(redis_server.url)
    assert [f["type"] for f in entries].count("breach") == 4, entries
    assert [f["type"] for f in entries].count("resolved") == 4, entries
    assert {(f["route"], f["quantile"], f["severity"]) for f in raised} == {
        (ROUTE, "p95", "warning"), (ROUTE, "p99", "critical"),
        ("*", "p95", "warning"), ("*", "p99", "critical"),
    }  # fmt: skip
    for f in entries:
        assert f["scope"] == "fleet" and f["fleet"] == "t", f
        assert f["instances"] in ("2", "3"), f
        assert int(f["samples"]) >= 10 or f["type"] == "resolved"
    by_rule: dict[tuple[str, str], list[str]] = {}
    for f in entries:
        by_rule.setdefault((f["route"], f["quantile"]), []).append(f["type"])
    assert all(seq == ["breach", "resolved"] for seq in by_rule.values()), by_rule
    assert len({f["event_id"] for f in entries}) == 8


@pytest.mark.slow
@pytest.mark.tools
async def test_both_scopes_label_their_events(upstream, redis_server):
    _, url = upstream
    rules = {"SIDECAR_P95_THRESHOLD_MS": "100", "SIDECAR_P99_THRESHOLD_MS": "120",
             "SIDECAR_MIN_SAMPLES": "10", "SIDECAR_BREACH_SCOPE": "both"}  # fmt: skip
    async with (
        fleet_of(2, url, redis_server.url, env=rules) as pods,
        aiohttp.ClientSession() as client,
    ):
        await asyncio.gather(*(burst(client, p.base, [150] * 12) for p in pods))

        async def all_there():
            entries = [f for f in await stream(redis_server.url) if f["type"] == "breach"]
            return entries if len(entries) >= 12 else None

        await until(all_there, timeout=15)
        await more_evaluations(client, pods, 2)  # instance rules run on the same ticks
        entries = [f for f in await stream(redis_server.url) if f["type"] == "breach"]
    scopes = [(f["scope"], f["instance"], f["fleet"], f["instances"]) for f in entries]
    # every breach says who caused it; the fleet's cannot tell (README "Fleet view")
    causes = {(f["scope"], f["cause"]) for f in entries}
    assert {c for s, c in causes if s == "fleet"} == {"unknown"}, causes
    assert {c for s, c in causes if s == "instance"} <= {"upstream", "sidecar", "unknown"}
    # 4 rules x (2 instances + 1 fleet), one event each
    assert sorted(s for s, *_ in scopes) == ["fleet"] * 4 + ["instance"] * 8, scopes
    assert all(fl == "" and n == "" for s, _, fl, n in scopes if s == "instance")
    assert all(fl == "t" and n == "2" for s, _, fl, n in scopes if s == "fleet")


@pytest.mark.slow
@pytest.mark.tools
async def test_dead_pod_leaves_the_fleet_view_within_one_window(upstream, redis_server):
    _, url = upstream
    async with (
        fleet_of(3, url, redis_server.url) as pods,
        aiohttp.ClientSession() as client,
    ):
        await burst(client, pods[2].base, [1] * 30)
        await burst(client, pods[0].base, [1] * 10)

        async def three():
            doc = await fleet_doc(client, pods[0])
            return len(doc["instances"]) == 3 and count(doc) == 40

        await until(three, timeout=10)
        pods[2].kill()
        killed_at = time.monotonic()
        await pods[2].wait()

        async def gone():
            doc = await fleet_doc(client, pods[0])
            return doc if doc["instances"] == ["pod-0", "pod-1"] else None

        doc = await until(gone, timeout=15)
        gone_s = time.monotonic() - killed_at
        print(f"dead pod left the fleet's instances {gone_s:.1f} s after SIGKILL (window 5 s)")
        assert gone_s <= 5 + 2.5 + 1.5 + 1  # window + settling + the last share's age + poll
        assert count(doc) == 0  # and its requests, which were older still, are gone too


@pytest.mark.slow
@pytest.mark.tools
async def test_redis_down_keeps_the_last_view_and_traffic_flat(upstream, redis_server):
    _, url = upstream
    async with (
        fleet_of(2, url, redis_server.url, env={"SIDECAR_WINDOWS_S": "30"}) as pods,
        aiohttp.ClientSession() as client,
    ):
        pod = pods[0]

        async def local_count(n):
            doc = await get_json(client, f"{pod.admin}/percentiles")
            return count(doc, window="30") == n

        async def fleet_count(n):
            doc = await fleet_doc(client, pod)
            return doc if count(doc, window="30") == n else None

        async def fresh():  # read just now, with both pods sharing again
            doc = await fleet_doc(client, pod)
            ok = doc["stale_s"] is not None and doc["stale_s"] < 1.5
            return doc if ok and doc["instances"] == ["pod-0", "pod-1"] else None

        await burst(client, pod.base, [0] * 50)  # warm-up
        baseline = await burst(client, pod.base, [0] * 300)
        sent = 350
        before = await until(lambda: fleet_count(350), timeout=10)
        breaches = await get_json(client, f"{pod.admin}/breaches?scope=fleet")
        assert breaches["stale_s"] == 0 and breaches["active"] == []
        for pause, resume in (
            (redis_server.pause, redis_server.resume),
            (redis_server.kill, redis_server.start),
        ):
            pause()
            try:
                during: list[float] = []
                t0 = time.monotonic()
                while time.monotonic() - t0 < 4:
                    during += await burst(client, pod.base, [0] * 20)
                sent += len(during)
                await until(lambda: local_count(sent), timeout=5)  # noqa: B023
                t1 = time.monotonic()
                stale = await fleet_doc(client, pod)
                answer_s = time.monotonic() - t1
                t1 = time.monotonic()
                breaches = await get_json(client, f"{pod.admin}/breaches?scope=fleet")
                assert time.monotonic() - t1 < 2.5  # the last ones read, with their age
                assert breaches["stale_s"] >= 2.5 and breaches["active"] == []
            finally:
                resume()
            print(f"{pause.__name__}: proxied p50/p99 before {exact(baseline, 0.5) * 1000:.2f}/"
                  f"{exact(baseline, 0.99) * 1000:.2f} ms, during {exact(during, 0.5) * 1000:.2f}/"
                  f"{exact(during, 0.99) * 1000:.2f} ms; fleet view answered in {answer_s:.2f} s "
                  f"with stale_s={stale['stale_s']}")  # fmt: skip
            # no request waited on Redis: that wait ends at the 2 s socket timeout
            assert max(during) < 1.5
            assert exact(during, 0.95) < max(
                3 * exact(baseline, 0.95), exact(baseline, 0.95) + 0.05
            )
            assert stale["stale_s"] >= 2.5  # the last view, with its age
            assert count(stale, window="30") == count(before, window="30")
            assert answer_s < 2.5
            t0 = time.monotonic()
            await until(fresh, timeout=10)
            print(f"fresh again {time.monotonic() - t0:.1f} s after {resume.__name__}")
            if pause == redis_server.pause:
                # nothing was lost: the seconds shared late arrive, each exactly once
                before = await until(lambda: fleet_count(sent), timeout=10)  # noqa: B023


@pytest.mark.slow
@pytest.mark.tools
async def test_clock_skew_of_700_ms(upstream, redis_server):
    """pod-1's clock runs 0.7 s ahead, pod-2's 0.7 s behind (libfaketime): the slots
    they write are offset by 700 ms from pod-0's; the fleet window still counts every
    request once."""
    libs = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    assert libs, "libfaketime missing: scripts/install-test-tools.sh installs faketime"
    up, url = upstream

    def skewed(offset: str) -> dict[str, str]:
        return {"LD_PRELOAD": libs[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    ctx = fleet_of(3, url, redis_server.url, env={"SIDECAR_WINDOWS_S": "10"},
                   pod_env={1: skewed("+0.7s"), 2: skewed("-0.7s")})  # fmt: skip
    async with ctx as pods, aiohttp.ClientSession() as client:
        times = []
        for _ in range(3):  # three rounds, spread over seconds and their boundaries
            rounds = await asyncio.gather(*(burst(client, p.base, [10, 20, 30] * 20)
                                            for p in pods))  # fmt: skip
            times += [t for ts in rounds for t in ts]
            await asyncio.sleep(0.35)

        async def complete():
            docs = [await fleet_doc(client, p) for p in pods]
            return docs if all(count(d, window="10") == len(times) for d in docs) else None

        docs = await until(complete, timeout=8)
    for d in docs:
        assert d["instances"] == ["pod-0", "pod-1", "pod-2"]
        stats = d["routes"][ROUTE]["10"]
        for key, q in QS:
            low, high = sandwich_ms(up.durations, times, q)
            assert low <= stats[key] <= high, (key, low, stats[key], high)


@pytest.mark.slow
@pytest.mark.tools
async def test_fleet_cli_prints_the_table(upstream, redis_server):
    _, url = upstream
    async with (
        fleet_of(2, url, redis_server.url, env={"SIDECAR_WINDOWS_S": "10"}) as pods,
        aiohttp.ClientSession() as client,
    ):
        await asyncio.gather(*(burst(client, p.base, [5] * 20) for p in pods))
        await until(lambda: _has(client, pods[0], 40), timeout=10)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "fleet", "--fleet", "t", "--redis-url",
             redis_server.url], env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(line for line in lines if line.startswith("route"))
    assert head.split()[-1] == "pods"
    row = next(line for line in lines if line.startswith(ROUTE))
    cells = row.split()
    assert cells[1] == "unary" and cells[2] == "40" and cells[-1] == "2", row
    assert "fleet t: 2 instances (pod-0, pod-1)" in out.stdout
    # and it says clearly when there is nothing to show
    missing = subprocess.run(
        [sys.executable, "-m", "sidecar", "fleet", "--fleet", "nobody", "--redis-url",
         redis_server.url], env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert missing.returncode == 0 and "no sidecar shares fleet nobody" in missing.stdout


async def _has(client, pod, n):
    return count(await fleet_doc(client, pod), window="10") == n


async def test_fleet_scope_needs_a_fleet(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{sc.admin_port}/percentiles?scope=fleet") as r:
            assert r.status == 404
            assert "SIDECAR_FLEET" in (await r.json())["error"]
        async with client.get(f"http://127.0.0.1:{sc.admin_port}/percentiles?scope=instance") as r:
            assert r.status == 200 and "routes" in await r.json()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIDECAR_FLEET": "web"}, "SIDECAR_FLEET: the fleet view shares through Redis"),
        ({"SIDECAR_FLEET": "a}b", "SIDECAR_REDIS_URL": "redis://x"}, "SIDECAR_FLEET: expected"),
        ({"SIDECAR_BREACH_SCOPE": "fleet"}, "SIDECAR_BREACH_SCOPE: 'fleet' needs SIDECAR_FLEET"),
        ({"SIDECAR_BREACH_SCOPE": "pods"}, "SIDECAR_BREACH_SCOPE"),
    ],
)
def test_fleet_settings_are_validated(env, message):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    full.update(SIDECAR_UPSTREAM_URL="http://127.0.0.1:1", **env)
    out = subprocess.run([sys.executable, "-m", "sidecar", "check-config"], env=full,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_one_fleets_keys_share_one_cluster_slot():
    """On Redis Cluster every script runs on one node: all keys a fleet's scripts touch
    carry the fleet's hash tag."""
    from redis.crc import key_slot

    from sidecar.fleet.store import Batch, RedisFleetStore
    from sidecar.window import SubWindow

    store = RedisFleetStore("redis://127.0.0.1:1", "web", "pod-0", "pod-0/1", [60, 300])
    sub = SubWindow()
    sub.add(100, 0.05)
    batch = Batch(1, time.time(), {("/v1/chat", False): sub, ("*", True): sub})
    _, keys, _ = store._share_call(batch, time.time())
    keys += [store.key("lease"), store.key("lease", "seq"), store.key("breaches"),
             store.key("outbox"), store.key("meta"), store.late_key(60)]  # fmt: skip
    assert len(keys) > 10
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"{web}")}
    other = RedisFleetStore("redis://127.0.0.1:1", "api", "pod-0", "pod-0/1", [60])
    assert not set(keys) & {other.key("lease"), other.key("instances")}


@pytest.mark.slow
@pytest.mark.tools
async def test_fleet_over_authenticated_tls_redis(upstream, tmp_path):
    """``rediss://`` with a password and a CA file in the URL, as in production."""
    _, url = upstream
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    def pings(port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, ssl=True, ssl_ca_certs=str(cert),
                                    password="fleet-secret", socket_timeout=1).ping())  # fmt: skip
        except (OSError, redis.RedisError):
            return False

    def argv(port: int) -> list[str]:
        return ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no", "--requirepass", "fleet-secret", "--save", "",
                "--dir", str(tmp_path)]  # fmt: skip

    # redis-server cannot report a port it picked: one free a moment ago, retried on a clash
    server, port = await asyncio.to_thread(start_with_retry, argv, pings)
    redis_url = f"rediss://:fleet-secret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        async with fleet_of(2, url, redis_url) as pods, aiohttp.ClientSession() as client:
            await asyncio.gather(*(burst(client, p.base, [1] * 10) for p in pods))
            doc = await until(lambda: _doc_with(client, pods[1], 20), timeout=10)
            assert doc["instances"] == ["pod-0", "pod-1"]
            # the password never reaches the logs
            assert b"fleet-secret" not in pods[0].stderr + pods[1].stderr
        wrong = redis_url.replace("fleet-secret", "wrong")
        async with fleet_of(1, url, wrong) as (pod,), aiohttp.ClientSession() as client:
            doc = await fleet_doc(client, pod)  # answers, with nothing read
            assert doc["stale_s"] is None and doc["instances"] == []
    finally:
        server.terminate()
        server.wait(10)


async def _doc_with(client, pod, n):
    doc = await fleet_doc(client, pod)
    return doc if count(doc) == n else None


@pytest.mark.slow
@pytest.mark.tools
def test_demo_with_three_replicas_shows_the_fleet(tmp_path):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["TMPDIR"] = str(private_tmp)
    cmd = [sys.executable, "-m", "sidecar", "demo", "--replicas", "3", "--duration", "7",
           "--refresh", "1", "--rps", "90"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stdout.rsplit("each pod alone", 1)[1]
    assert {line.split()[0] for line in last.splitlines() if line.startswith("demo-pod-")} == {
        "demo-pod-0", "demo-pod-1", "demo-pod-2"
    }  # fmt: skip
    assert "3 instances (demo-pod-0, demo-pod-1, demo-pod-2)" in last
    fleet_rows = last.split("pods\n", 1)[1]
    star = next(line for line in fleet_rows.splitlines() if line.startswith("*"))
    assert star.split()[-1] == "3"  # all three pods in the fleet's `*` row
    assert "demo finished" in out.stdout
    # the private redis-server is gone with its directory
    assert list(private_tmp.iterdir()) == []
    # no Redis anywhere: one line saying what to install
    bare = dict(env, PATH=str(private_tmp))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=bare)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "the fleet demo needs Redis: set SIDECAR_REDIS_URL, or install redis-server "
        "(apt-get install redis-server)"
    ]


@pytest.mark.tools
async def test_late_writes_are_read_again_and_retries_count_once(redis_server):
    """A sidecar whose second arrives after readers took that slot (it was slow, or
    Redis was) marks it late; readers read the slot again. A batch sent twice (a retry
    after a timeout) counts once."""
    from sidecar.fleet.store import Batch, RedisFleetStore
    from sidecar.fleet.view import FleetView
    from sidecar.window import SubWindow

    def second(n: int, ms: float) -> dict:
        sub = SubWindow()
        for _ in range(n):
            sub.add(bucket_of(ms / 1000), ms / 1000)
        return {(ROUTE, False): sub}

    stores = [RedisFleetStore(redis_server.url, "late", f"pod-{i}", f"pod-{i}/x", [10])
              for i in range(2)]  # fmt: skip
    reader = FleetView(stores[0], "late", [10])
    try:
        at = time.time() - 5  # a slot every reader considers settled already
        await stores[0].share([Batch(1, at, second(10, 20))], now=time.time(), want_lease=True)
        await reader.refresh()
        assert reader.snapshot().stats[(ROUTE, False)][10].count == 10
        late = Batch(1, at, second(5, 300))
        await stores[1].share([late], now=time.time(), want_lease=True)
        await stores[1].share([late], now=time.time(), want_lease=True)  # the retry
        await reader.refresh()
        stats = reader.snapshot().stats
        assert stats[(ROUTE, False)][10].count == 15
        assert stats[("*", False)][10].count == 15  # `*` is summed from the routes
        assert stats[(ROUTE, False)][10].max == pytest.approx(0.3)
        assert reader.pods[(ROUTE, False)] == 2
    finally:
        for st in stores:
            await st.aclose()


def test_slot_payloads_no_sidecar_wrote_are_skipped():
    from sidecar.fleet.store import _parse, key_of

    assert _parse("5 3 m 0.1").count == 3
    for bad in ("5 3 m ", "5 1" + "0" * 309, "5 -1", "99999999 1", "x y", "5"):
        assert _parse(bad).count == 0, bad
    # member names: what a sidecar writes (printable labels of at most 128 characters)
    assert key_of("u:/v1/chat") == ("/v1/chat", False) and key_of("s:*") == ("*", True)
    for bad in ("u:/x\x1b[2J", "u:" + "a" * 129, "x:/y", "u:"):
        assert key_of(bad) is None, bad


@pytest.mark.slow
@pytest.mark.tools
async def test_what_no_sidecar_wrote_in_redis_does_not_stop_the_fleet(upstream, redis_server):
    """Redis is shared; its contents are not ours. Entries of the wrong shape in the
    outbox, the rules' state and the instances set are dropped or ignored: the fleet's
    breach still comes, exactly once, and every fleet endpoint answers."""
    _, url = upstream
    client_r = aioredis.Redis.from_url(redis_server.url)
    prefix = "sidecar:fleet:{t}"
    junk = ["[]", '{"fields":{"event_id":"x","a":{}}}', "[" * 50_000]
    await client_r.rpush(f"{prefix}:outbox", *junk)
    # the very rule about to breach holds a state no sidecar wrote: it is overwritten
    await client_r.hset(f"{prefix}:breaches", mapping={
        f"p95 u:{ROUTE}": "1 [1]", "p95 u:*": "2 " + "[" * 50_000, "junk": "x y"})  # fmt: skip
    await client_r.zadd(f"{prefix}:instances", {b"\xff\xfe": 9e15})
    rules = {"SIDECAR_P95_THRESHOLD_MS": "100", "SIDECAR_P99_THRESHOLD_MS": "10000",
             "SIDECAR_MIN_SAMPLES": "10", "SIDECAR_BREACH_SCOPE": "fleet"}  # fmt: skip
    try:
        async with (
            fleet_of(1, url, redis_server.url, env=rules) as (pod,),
            aiohttp.ClientSession() as client,
        ):
            await burst(client, pod.base, [150] * 12)

            async def raised():
                fleet = [f for f in await stream(redis_server.url) if f["type"] == "breach"]
                return fleet if len(fleet) >= 2 else None  # the route and "*"

            entries = await until(raised, timeout=15)
            assert await client_r.llen(f"{prefix}:outbox") == 0  # drained, junk too
            for path in ("/breaches?scope=fleet", "/percentiles?scope=fleet"):
                doc = await get_json(client, f"{pod.admin}{path}")
                assert doc["fleet"] == "t", doc
            await more_evaluations(client, [pod], 2)
            assert len([f for f in await stream(redis_server.url) if f["type"] == "breach"]) == 2
            assert b"Traceback" not in pod.stderr, pod.stderr.decode()[-3000:]
    finally:
        await client_r.aclose()
    assert {(f["route"], f["quantile"]) for f in entries} == {(ROUTE, "p95"), ("*", "p95")}
