"""The image and the compose stack, built and run for real (issue 17).

The engine and the images come from tests/docker_env.py (a private dockerd and
debootstrapped / Debian stand-ins where no registry is reachable). Containers use the
host network; every port is a free one chosen here.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from .conftest import free_ports, serve_app
from .docker_env import DEPLOY, FIGURES, LABEL, ROOT, Docker
from .upstream import Upstream

pytestmark = [pytest.mark.slow, pytest.mark.tools, pytest.mark.timeout(1800)]

MiB = 1024 * 1024


async def wait_until(what: str, probe, timeout: float, interval: float = 0.5):
    """Poll `probe()` (async) until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


async def http_status(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
        await r.read()
        return r.status


# --- the image ------------------------------------------------------------------------


def k8s_sidecar_constraints() -> tuple[list[str], str]:
    """`docker run` flags equivalent to the sidecar's security context in the k8s
    Deployment, and the tmpfs mounts where the manifest mounts an emptyDir."""
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "latency-sidecar"]
    sc = sidecar["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    flags = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--user", user]  # fmt: skip
    empty_dirs = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
    for mount in sidecar.get("volumeMounts", []):
        spec = empty_dirs[mount["name"]]  # only emptyDirs: nothing else is writable
        size = spec.get("sizeLimit", "16Mi").replace("Mi", "m")
        flags += ["--tmpfs", f"{mount['mountPath']}:size={size}"]
    return flags, user


# Run inside the image (one container: with the vfs storage driver each one is a full
# copy): build tools on PATH, files of our tests/ and bench/ (by name and content)
# anywhere in the filesystem, /wheels, the installed distribution's files.
INSPECT = """
import hashlib, importlib.metadata as m, json, os, shutil, sys
wanted = json.loads(sys.argv[1])
hits = []
for top in ("/usr", "/opt", "/srv", "/home", "/root", "/tmp", "/app", "/src", "/etc", "/var"):
    for d, _, files in os.walk(top):
        for f in files:
            if f in wanted:
                p = os.path.join(d, f)
                try:
                    h = hashlib.sha256(open(p, "rb").read()).hexdigest()
                except OSError:
                    continue
                if h in wanted[f]:
                    hits.append(p)
tools = "gcc cc c++ g++ clang ld as make cython".split()
print(json.dumps({
    "tools": [t for t in tools if shutil.which(t)],
    "hits": hits,
    "wheels": os.path.exists("/wheels"),
    "dist": [str(f) for f in m.files("latency-sidecar")],
}))
"""


def project_files(*dirs: str) -> dict[str, list[str]]:
    wanted: dict[str, list[str]] = {}
    for d in dirs:
        for p in (ROOT / d).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.stat().st_size:
                wanted.setdefault(p.name, []).append(hashlib.sha256(p.read_bytes()).hexdigest())
    return wanted


def test_image_has_no_compiler_no_tests_and_reports_its_size(docker_engine, sidecar_image):
    docker: Docker = docker_engine
    out = docker.run("run", "--rm", "--label", LABEL, "--network", "none", "--entrypoint",
                     "python", sidecar_image, "-c", INSPECT,
                     json.dumps(project_files("tests", "bench", "loadtest")))  # fmt: skip
    found = json.loads(out.stdout)
    assert found["tools"] == [], f"build tools in the image: {found['tools']}"
    assert found["hits"] == [], f"test/bench files in the image: {found['hits']}"
    assert found["wheels"] is False
    # the installed distribution is the package and its entry point, nothing else
    ours_re = r"(sidecar/|latency_sidecar-[^/]+\.dist-info/|\.\./\.\./\.\./bin/latency-sidecar$)"
    strays = [f for f in found["dist"] if not re.match(ours_re, f)]
    assert found["dist"] and not strays, strays

    # size: the whole image on the base it was built on, and our layers alone (what the
    # image adds to the official python base too: the same steps, the same wheels)
    size = int(docker.run("image", "inspect", "-f", "{{.Size}}", sidecar_image).stdout)
    base = (ROOT / "Dockerfile").read_text().split("FROM ")[-1].split()[0]
    base_size = int(docker.run("image", "inspect", "-f", "{{.Size}}", base).stdout)
    ours = size - base_size
    layers = docker.run("history", "--format", "{{.Size}}\t{{.CreatedBy}}", sidecar_image)
    top = [line.split("\t", 1) for line in layers.stdout.splitlines()[:8]]
    FIGURES["image size on the stand-in base"] = (
        f"{size / MiB:.1f} MiB (base {base_size / MiB:.1f} MiB, our layers {ours / MiB:.1f} MiB)"
    )
    FIGURES["our layers (docker history, newest first)"] = "; ".join(
        f"{s} {c.strip()[:60]}" for s, c in top if s not in ("0B", "0")
    )
    assert ours < 120 * MiB, f"our layers grew to {ours / MiB:.0f} MiB"


async def test_image_runs_locked_down_proxies_turns_healthy_and_drains_on_sigterm(
    docker_engine, sidecar_image
):
    docker: Docker = docker_engine
    up = Upstream()
    async with serve_app(up.app()) as upstream_url, aiohttp.ClientSession() as client:
        flags, user = k8s_sidecar_constraints()
        name = ""
        try:
            t0 = time.monotonic()
            # the container cannot bind port 0 and tell us (its HEALTHCHECK follows the
            # admin port it was given): ports free a moment ago, new ones on a clash
            for attempt in range(3):
                port, admin = free_ports(2)
                name = f"ls-image-{uuid.uuid4().hex[:8]}"
                rc, out, err = await docker.arun(
                    "run", "-d", "--name", name, "--label", LABEL, "--network", "host", *flags,
                    "-e", f"SIDECAR_UPSTREAM_URL={upstream_url}",
                    "-e", f"SIDECAR_LISTEN=127.0.0.1:{port}",
                    "-e", f"SIDECAR_ADMIN_LISTEN=127.0.0.1:{admin}",
                    "-e", "SIDECAR_INSTANCE=image-test",
                    "-e", "SIDECAR_SHUTDOWN_GRACE_S=20",
                    sidecar_image,
                )  # fmt: skip
                assert rc == 0, out + err
                base, admin_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
                probe = functools.partial(_started, docker, client, name, admin_base)
                if await wait_until("/healthz 200", probe, 30) == "up":
                    break
                _, logs, logs_err = await docker.arun("logs", name)
                await docker.arun("rm", "-f", name)
                clash = "already in use" in logs + logs_err
                assert clash and attempt < 2, logs + logs_err
            FIGURES["image: docker run -> /healthz 200"] = f"{time.monotonic() - t0:.1f} s"
            assert await http_status(client, admin_base + "/readyz") == 200

            # locked down as the manifest asks: uid, no capabilities, read-only root
            rc, status, _ = await docker.arun("exec", name, "cat", "/proc/1/status")
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            assert fields["Uid"].split()[0] == user.split(":")[0] == "10001"
            assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
            assert fields["NoNewPrivs"].strip() == "1"
            rc, _, err = await docker.arun("exec", name, "sh", "-c", "echo x > /x")
            assert rc != 0 and "Read-only file system" in err
            rc, _, err = await docker.arun("exec", name, "sh", "-c", "echo x > /tmp/x")
            assert rc == 0, err  # the one tmpfs

            # real traffic, proxied unchanged to the upstream on the host network
            body = os.urandom(256 * 1024)
            async with client.post(base + "/echo/upload?x=1", data=body) as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["len"] == len(body) and doc["sha256"] == hashlib.sha256(body).hexdigest()
            assert doc["path_qs"] == "/echo/upload?x=1"
            async with client.get(admin_base + "/metrics") as r:
                metrics = await r.text()
            assert re.search(r'sidecar_request_duration_seconds_count\{[^}]*code="200"', metrics)

            # Docker's own verdict from the image's HEALTHCHECK (it follows the admin port)
            async def health() -> str | None:
                _, out, _ = await docker.arun("inspect", "-f", "{{json .State.Health}}", name)
                status = json.loads(out)["Status"]
                assert status != "unhealthy", out
                return str(status) if status == "healthy" else None

            await wait_until("docker health 'healthy'", health, 60, interval=1)
            FIGURES["image: docker run -> docker health 'healthy'"] = (
                f"{time.monotonic() - t0:.1f} s"
            )

            # SIGTERM with requests in flight: they finish, then the process exits 0
            up.expect_arrivals = 4
            held = [asyncio.create_task(_get_json(client, base + "/hold")) for _ in range(4)]
            await asyncio.wait_for(up.arrived_event.wait(), 10)
            rc, _, err = await docker.arun("kill", "--signal", "TERM", name)
            assert rc == 0, err
            await wait_until(
                "/readyz 503 while draining",
                lambda: _is(http_status(client, admin_base + "/readyz"), 503),
                10, interval=0.1,
            )  # fmt: skip
            assert not any(t.done() for t in held)
            up.release.set()
            results = await asyncio.wait_for(asyncio.gather(*held), 20)
            assert results == [(200, {"held": True})] * 4
            rc, code, err = await docker.arun("wait", name, timeout=30)
            assert rc == 0 and code.strip() == "0", (code, err)
            _, logs_out, logs_err = await docker.arun("logs", name)
            assert "Traceback" not in logs_out + logs_err, logs_err[-3000:]
        finally:
            if name:
                await docker.arun("rm", "-f", name)


async def _started(
    docker: Docker, client: aiohttp.ClientSession, name: str, admin_base: str
) -> str | None:
    """ "up" once the container answers /healthz, "exited" if it stopped (a port clash)."""
    _, running, _ = await docker.arun("inspect", "-f", "{{.State.Running}}", name)
    if running.strip() != "true":
        return "exited"
    return "up" if await http_status(client, admin_base + "/healthz") == 200 else None


async def _is(coro, expected) -> bool:
    return bool((await coro) == expected)


async def _get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, await r.json()


# --- the compose stack ----------------------------------------------------------------

STACK_SERVICES = [
    "gateway",
    "sidecar",
    "redis",
    "prometheus",
    "alertmanager",
    "receiver",
    "traffic",
]  # fmt: skip  (Grafana: no image here; the dashboard is proven
# against a real Prometheus in test_deploy.py)


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose") or "docker-compose"]
    return [shutil.which("docker") or "docker", "compose"]


def compose_without_ports(config_dir: Path) -> Path:
    """deploy/compose.yaml less its `ports:` lists, nothing else changed: published
    ports mean nothing on the host network, docker-compose 1.29 refuses them there
    ("host network_mode is incompatible with port_bindings"), and an override file can
    add to a list but not remove it. Used with --project-directory deploy/, so every
    relative path resolves as in the product file."""
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in doc["services"].values():
        svc.pop("ports", None)
    path = config_dir / "compose.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def stack_configs(config_dir: Path, ports: dict[str, int]) -> None:
    """The product's Prometheus and Alertmanager configs with `service:port` addresses
    moved to 127.0.0.1 and the test's ports (service names do not resolve on the host
    network)."""
    moves = {
        "sidecar:9901": ports["ADMIN"],
        "alertmanager:9093": ports["ALERTMANAGER"],
        "receiver:9000": ports["RECEIVER"],
    }
    for rel in ("prometheus/prometheus.yml", "alertmanager/alertmanager.yml"):
        text = (DEPLOY / rel).read_text()
        for old, new in moves.items():
            text = text.replace(old, f"127.0.0.1:{new}")
        assert not re.search(r"\b(sidecar|alertmanager|receiver|gateway|redis):\d", text), text
        (config_dir / Path(rel).name).write_text(text)
        (config_dir / Path(rel).name).chmod(0o644)
    config_dir.chmod(0o755)  # prometheus and alertmanager run as nobody


async def test_compose_stack_breaches_reach_redis_receiver_and_alertmanager(
    docker_engine, local_images, sidecar_image
):
    docker: Docker = docker_engine
    names = ["GATEWAY", "PROXY", "ADMIN", "RECEIVER", "REDIS", "PROMETHEUS", "ALERTMANAGER"]
    project = f"ls-stack-{uuid.uuid4().hex[:8]}"
    config_dir = Path(tempfile.mkdtemp(prefix="ls-stack-"))
    env: dict[str, str] = {}
    compose = [*compose_command(), "-p", project, "--project-directory", str(DEPLOY),
               "-f", str(compose_without_ports(config_dir)),
               "-f", str(DEPLOY / "testing" / "compose.hostnet.yaml")]  # fmt: skip

    async def run(*args: str, timeout: float = 300) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *compose, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    red = None
    try:
        t_up = time.monotonic()
        # the services cannot bind port 0 and tell us (they run on the host network):
        # ports free a moment ago, and a new set if one was taken meanwhile
        for attempt in range(3):
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            stack_configs(config_dir, ports)
            env.clear()
            env.update(docker.env, STACK_CONFIG_DIR=str(config_dir))
            env.update({f"STACK_{n}_PORT": str(p) for n, p in ports.items()})
            # `up` returns once each service is started, dependencies healthy first
            rc, out, err = await run("up", "-d", "--no-build", *STACK_SERVICES)
            if rc == 0:
                break
            _, logs, _ = await run("logs", "--no-color", "--tail", "40", timeout=30)
            await run("down", "-v", "--remove-orphans", timeout=300)
            clash = "already in use" in out + err + logs
            assert clash and attempt < 2, out + err + logs
        t_healthy = time.monotonic()
        FIGURES["stack: compose up (dependencies healthy)"] = f"{t_healthy - t_up:.1f} s"
        prom = f"http://127.0.0.1:{ports['PROMETHEUS']}"
        am = f"http://127.0.0.1:{ports['ALERTMANAGER']}"
        admin = f"http://127.0.0.1:{ports['ADMIN']}"
        red = aioredis.Redis(port=ports["REDIS"], decode_responses=True)

        async with aiohttp.ClientSession() as client:

            async def get_json(url: str) -> Any:
                async with client.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    assert r.status == 200, url
                    return await r.json()

            # the first breach in the receiver's log, its signature verified on receipt
            async def receiver_breach() -> dict | None:
                _, out, _ = await run("logs", "--no-color", "receiver", timeout=30)
                assert "bad signature" not in out, out[-2000:]
                for doc in filter(None, map(_json_in, out.splitlines())):
                    if doc.get("msg") != "webhook received" or doc["path"] != "/hooks/latency":
                        continue
                    if doc["payload"].get("type") == "breach":
                        return doc
                return None

            try:
                first = await wait_until("a breach in the receiver's log", receiver_breach, 150)
            except AssertionError:
                _, logs, _ = await run("logs", "--no-color", "--tail", "40", timeout=30)
                raise AssertionError(f"no breach reached the receiver; logs:\n{logs}") from None
            FIGURES["stack: compose up -> first breach in the receiver"] = (
                f"{time.monotonic() - t_up:.1f} s"
            )
            # the gateway's slow phase starts 5 s into the traffic (which starts once
            # the stack is healthy), not a minute after the gateway itself started
            assert time.monotonic() - t_healthy < 35  # it was ~40 s (5 s measured now)
            assert first["verified"] is True, first  # signed by the sidecar, checked
            event = first["payload"]
            assert event["instance"] == "sidecar-compose" and event["severity"] in (
                "warning",
                "critical",
            )

            # the same breaches in the Redis Stream
            async def stream_breach() -> list:
                entries: Any = await red.xrange("sidecar:events", count=1000)
                return [f for _, f in entries if f["type"] == "breach"]

            breaches = await wait_until("breach events in Redis", stream_breach, 30)
            assert any(b["event_id"] == event["event_id"] for b in breaches), (event, breaches)

            # Prometheus: the sidecar target up, the product's rules loaded
            async def target_up() -> bool:
                doc = await get_json(f"{prom}/api/v1/targets")
                return any(
                    t["labels"]["job"] == "latency-sidecar" and t["health"] == "up"
                    for t in doc["data"]["activeTargets"]
                )

            await wait_until("Prometheus scraping the sidecar (up)", target_up, 60)
            rules_file = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
            want = {
                r.get("alert") or r.get("record") for g in rules_file["groups"] for r in g["rules"]
            }
            doc = await get_json(f"{prom}/api/v1/rules")
            loaded = {r["name"] for g in doc["data"]["groups"] for r in g["rules"]}
            assert loaded == want
            doc = await get_json(f"{prom}/api/v1/query?query=sidecar_target_up")
            assert [r["value"][1] for r in doc["data"]["result"]] == ["1"]

            # Alertmanager holds the sidecar's pushed alert
            async def am_alert() -> list:
                async with client.get(f"{am}/api/v2/alerts") as r:
                    alerts = await r.json()
                return [a for a in alerts if a["labels"].get("alertname") == "LatencyBreach"]

            alerts = await wait_until("a LatencyBreach alert in Alertmanager", am_alert, 60)
            assert alerts[0]["labels"]["instance"] == "sidecar-compose"

            # ... and Alertmanager forwards it to the receiver (unsigned, on its own path)
            async def forwarded() -> dict | None:
                _, out, _ = await run("logs", "--no-color", "receiver", timeout=30)
                for doc in filter(None, map(_json_in, out.splitlines())):
                    if doc.get("path") == "/hooks/alertmanager":
                        return doc
                return None

            doc = await wait_until("Alertmanager's webhook in the receiver's log", forwarded, 60)
            assert doc["verified"] is False and doc["payload"]["receiver"] == "example-webhook"

            # the sidecar's process stats are the gateway's (PID 1 of the shared namespace)
            stats = await get_json(f"{admin}/stats")
            assert stats["target"]["pid"] == 1 and "error" not in stats["target"], stats["target"]
            rc, cmdline, err = await run("exec", "-T", "sidecar", "cat", "/proc/1/cmdline")
            assert rc == 0 and "demo-gateway" in cmdline, cmdline + err

        # every service with a healthcheck is healthy; traffic has none (a client), and
        # the receiver's is its own
        rc, ids, err = await run("ps", "-q")
        assert rc == 0, err
        states = {}
        for cid in ids.split():
            _, out, _ = await docker.arun("inspect", cid)
            (c,) = json.loads(out)
            svc = c["Config"]["Labels"]["com.docker.compose.service"]
            states[svc] = (c["State"]["Status"], (c["State"].get("Health") or {}).get("Status"))
        assert states == {
            **{s: ("running", "healthy") for s in STACK_SERVICES if s != "traffic"},
            "traffic": ("running", None),
        }, states
    finally:
        if red is not None:
            await red.aclose()
        rc, out, err = await run("down", "-v", "--remove-orphans", timeout=300)
        shutil.rmtree(config_dir, ignore_errors=True)
    assert rc == 0, out + err
    label = f"label=com.docker.compose.project={project}"
    for kind in ("ps -a", "volume ls", "network ls"):
        _, left, _ = await docker.arun(*kind.split(), "-q", "--filter", label)
        assert left.strip() == "", f"{kind} after down -v: {left}"


def _json_in(line: str) -> dict | None:
    start = line.find("{")
    if start < 0:
        return None
    try:
        doc = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
