"""Runtime stats (/stats, sidecar_target_*) and the profiling listener (issue 5)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .process import spawn_sidecar

TOKEN = "prof-" + "k" * 40

# A stand-in gateway: sets its process name (comm), holds 64 MiB and 3 extra threads.
CHILD = r"""
import ctypes, sys, threading, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
ballast = bytearray(64 * 1024 * 1024)
for i in range(len(ballast) // 4096):
    ballast[i * 4096] = 1  # touch every page so it is resident
for _ in range(3):
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
print("ready", flush=True)
time.sleep(120)
"""


async def start_child(name):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, name, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    return proc


async def get_json(client, url, **kw):
    async with client.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_stats_reports_target_by_name_and_follows_a_restart(upstream, make_sidecar):
    _, url = upstream
    name = "gw-" + uuid.uuid4().hex[:8]
    child = await start_child(name)
    sc = await make_sidecar(url, target_name=name)
    stats_url = f"http://127.0.0.1:{sc.admin_port}/stats"
    try:
        async with aiohttp.ClientSession() as client:
            doc = await get_json(client, stats_url)
            target = doc["target"]
            assert target["pid"] == child.pid and target["name"] == name
            assert target["rss_bytes"] >= 64 * 1024 * 1024
            assert target["threads"] >= 4
            assert target["open_fds"] >= 3 and target["status"] in ("sleeping", "running")
            assert target["cpu_seconds"] is not None and target["create_time"] > 0
            assert "unavailable" not in target  # root reads everything

            me = doc["sidecar"]
            assert me["pid"] == os.getpid() and me["rss_bytes"] > 0 and me["threads"] >= 1
            for key in (
                "event_loop_lag_ms",
                "event_loop_lag_max_1m_ms",
                "asyncio_tasks",
                "in_flight",
                "uptime_s",
                "gc",
                "cpu_percent",
                "ctx_switches",
            ):
                assert key in me, key
            assert doc["system"]["cpu_count"] >= 1 and len(doc["system"]["load_average"]) == 3

            async with client.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r:
                fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
            assert fams["sidecar_target_rss_bytes"].samples[0].value >= 64 * 1024 * 1024
            assert fams["sidecar_target_threads"].samples[0].value >= 4
            assert fams["sidecar_target_up"].samples[0].value == 1
            assert "sidecar_target_cpu_seconds" in fams
            assert "sidecar_target_open_fds" in fams
            assert "sidecar_event_loop_lag_seconds" in fams

            child.kill()
            await child.wait()
            sc.runtime.last_at = 0  # no caching between the two reads below
            gone = (await get_json(client, stats_url))["target"]
            assert gone["pid"] is None and name in gone["error"]

            child = await start_child(name)  # the gateway restarts: new PID
            sc.runtime.last_at = 0
            back = (await get_json(client, stats_url))["target"]
            assert back["pid"] == child.pid
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_missing_target_pid_is_a_clear_error_not_an_error_page(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url, target_pid=4_000_000)  # above pid_max
    async with aiohttp.ClientSession() as client:
        doc = await get_json(client, f"http://127.0.0.1:{sc.admin_port}/stats")
    assert doc["target"]["pid"] is None
    assert "4000000" in doc["target"]["error"]
    assert doc["sidecar"]["rss_bytes"] > 0


async def test_no_target_configured_is_null(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url)
    async with aiohttp.ClientSession() as client:
        doc = await get_json(client, f"http://127.0.0.1:{sc.admin_port}/stats")
    assert doc["target"] is None


def test_fields_the_kernel_refuses_come_back_null_with_a_reason():
    """Read a process of another UID without ptrace rights. As root: fork, drop to
    nobody in the child and read this (root) process; otherwise read PID 1 (root)."""
    from sidecar.runtime import Target

    if os.geteuid() != 0:
        doc = Target(1, "").sample()
    else:
        parent = os.getpid()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: nothing but the read, then _exit
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(w, json.dumps(Target(parent, "").sample()).encode())
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        doc = json.loads(b"".join(chunks))
    assert doc is not None
    assert doc["pid"] is not None  # found, and readable in part
    assert doc["rss_bytes"] is not None  # /proc/PID/statm is world-readable
    refused = doc["unavailable"]
    assert doc["open_fds"] is None and "access denied" in refused["num_fds"]
    assert doc["io"] is None and "access denied" in refused["io_counters"]


def _cgroup(root, **files: str):
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for name, text in files.items():
        (root / name.replace("_", ".", 1)).write_text(text)
    return root


def test_cgroup_limits_and_usage_from_a_cgroup_v2_tree(tmp_path):
    """A cgroup v2 directory as the kernel lays it out (files written here, read by the
    real code): limits, usage, throttling; `max` is no limit; no cgroup v2, None."""
    from sidecar.runtime.system import cgroup_doc

    assert cgroup_doc(tmp_path / "none") is None
    root = _cgroup(
        tmp_path / "limited",
        cpu_max="50000 100000\n",
        cpu_stat="usage_usec 2500000\nuser_usec 2000000\nnr_periods 40\n"
        "nr_throttled 7\nthrottled_usec 350000\n",
        memory_max="536870912\n",
        memory_current="104857600\n",
    )
    assert cgroup_doc(root) == {
        "cpu_limit_cores": 0.5,
        "cpu_usage_seconds": 2.5,
        "cpu_nr_throttled": 7,
        "cpu_throttled_seconds": 0.35,
        "memory_limit_bytes": 536870912,
        "memory_usage_bytes": 104857600,
    }
    root = _cgroup(tmp_path / "unlimited", cpu_max="max 100000\n", memory_max="max\n")
    assert cgroup_doc(root) == {"cpu_limit_cores": None, "memory_limit_bytes": None}


def test_cgroup_files_with_unexpected_content_leave_fields_out(tmp_path):
    from sidecar.runtime.system import cgroup_doc, system_doc

    root = _cgroup(
        tmp_path / "odd",
        cpu_max="fifty 0\n",
        cpu_stat="usage_usec lots\nnr_throttled\n\nthrottled_usec 5\n",
        memory_max="\x00\xff garbage",
        memory_current="",
    )
    assert cgroup_doc(root) == {}
    assert cgroup_doc(_cgroup(tmp_path / "zero", cpu_max="100 0")) == {}
    doc = system_doc()  # this machine, whatever its cgroup: every field, no error
    assert doc["cpu_count"] >= 1 and len(doc["load_average"]) == 3
    assert 0 < doc["memory"]["available_bytes"] <= doc["memory"]["total_bytes"]


@pytest.fixture
async def profiled(upstream, make_sidecar):
    up, url = upstream
    sc = await make_sidecar(
        url, profiling_enabled=True, profiling_token=TOKEN, profiling_listen="127.0.0.1:0"
    )
    async with aiohttp.ClientSession() as client:
        yield up, sc, client, f"http://127.0.0.1:{sc.profiling_port}"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_every_profiling_request_needs_the_token(profiled):
    _, sc, client, prof = profiled
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-" + "x" * 30},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Basic " + "dXNlcjpwYXNz"},
        {"Authorization": TOKEN},
    ):
        for path in ("/debug/pprof/gc", "/debug/runtime", "/debug/pprof/nope"):
            async with client.get(prof + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert r.headers["WWW-Authenticate"] == "Bearer"
    async with client.get(prof + "/debug/pprof/gc", headers=AUTH) as r:
        assert r.status == 200
        assert "generations" in await r.json()
    # the admin listener does not serve profiling endpoints
    for path in ("/debug/pprof/cpu", "/debug/pprof/heap", "/debug/runtime"):
        async with client.get(f"http://127.0.0.1:{sc.admin_port}{path}", headers=AUTH) as r:
            assert r.status == 404


async def load(client, base, stop):
    while not stop.is_set():
        async with client.get(f"{base}/echo/1") as r:
            await r.read()


@pytest.mark.slow
async def test_profiles_under_load_show_the_sidecars_own_code(profiled):
    up, sc, client, prof = profiled
    base = f"http://127.0.0.1:{sc.proxy_port}"
    stop = asyncio.Event()
    loaders = [asyncio.create_task(load(client, base, stop)) for _ in range(8)]
    try:
        cpu = asyncio.create_task(client.get(prof + "/debug/pprof/cpu?seconds=1.5", headers=AUTH))
        assert sc.profiler is not None
        while not sc.profiler.busy:  # noqa: ASYNC110 (a lock on another task: polled)
            await asyncio.sleep(0.01)
        async with client.get(prof + "/debug/pprof/cpu?seconds=1", headers=AUTH) as r:
            assert r.status == 409
        async with await cpu as r:
            assert r.status == 200
            text = await r.text()
        assert "samples over 1.5 s" in text and "sidecar/proxy.py" in text

        async with client.get(
            prof + "/debug/pprof/cpu?seconds=1&format=collapsed", headers=AUTH
        ) as r:
            folded = await r.text()
        line = next(ln for ln in folded.splitlines() if "handle (" in ln)
        stack, count = line.rsplit(" ", 1)
        assert int(count) >= 1 and ";" in stack

        async with client.get(prof + "/debug/pprof/heap", headers=AUTH) as r:
            assert "tracemalloc was off" in await r.text()
        async with client.get(prof + "/debug/pprof/allocs?seconds=1", headers=AUTH) as r:
            allocs = await r.text()
        assert "allocation growth over 1 s" in allocs and "size=" in allocs
        async with client.get(prof + "/debug/pprof/heap", headers=AUTH) as r:
            heap = await r.text()
        assert "tracemalloc was off" not in heap and "/sidecar/" in heap

        up.expect_arrivals = 3
        held = [asyncio.create_task(client.get(f"{base}/hold")) for _ in range(3)]
        await asyncio.wait_for(up.arrived_event.wait(), 10)
        async with client.get(prof + "/debug/pprof/tasks", headers=AUTH) as r:
            tasks = await r.text()
        assert "percentile-ticker" in tasks and "loop-lag" in tasks
        assert tasks.count("sidecar/proxy.py") >= 3  # the held requests, mid-forward
        up.release.set()
        for t in held:
            (await t).release()

        async with client.get(prof + "/debug/pprof/threads", headers=AUTH) as r:
            assert "MainThread" in await r.text()
        async with client.get(prof + "/debug/pprof/gc?objects=1", headers=AUTH) as r:
            assert "dict" in (await r.json())["top_types"]
        async with client.get(prof + "/debug/runtime", headers=AUTH) as r:
            assert set(await r.json()) == {"sidecar", "target", "system"}
        async with client.get(prof + "/debug/pprof/cpu?seconds=61", headers=AUTH) as r:
            assert r.status == 400
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    import tracemalloc

    tracemalloc.stop()


async def test_token_never_logged_and_weak_token_refused(upstream):
    _, url = upstream
    sc = await spawn_sidecar(
        url, SIDECAR_PROFILING_ENABLED="true", SIDECAR_PROFILING_TOKEN=TOKEN,
        SIDECAR_PROFILING_LISTEN="127.0.0.1:0", SIDECAR_LOG_LEVEL="debug",
    )  # fmt: skip
    prof_port = sc.profiling_port
    async with aiohttp.ClientSession() as client:
        for headers in (AUTH, {"Authorization": "Bearer " + TOKEN[:-1]}):
            async with client.get(
                f"http://127.0.0.1:{prof_port}/debug/runtime", headers=headers
            ) as r:
                await r.read()
        async with client.get(f"{sc.admin}/stats") as r:
            assert TOKEN not in await r.text()
    sc.terminate()
    assert await sc.wait() == 0
    logs = sc.stderr.decode()
    assert "profiling" in logs and TOKEN not in logs and TOKEN[:20] not in logs

    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(SIDECAR_UPSTREAM_URL=url, SIDECAR_PROFILING_ENABLED="true",
               SIDECAR_PROFILING_TOKEN="too-short")  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "sidecar", "run"], env=env,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "SIDECAR_PROFILING_TOKEN" in out.stderr and "too-short" not in out.stderr
