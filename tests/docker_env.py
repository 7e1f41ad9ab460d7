"""A Docker engine and the images the container tests need (issue 17).

`docker_engine` uses the engine that answers (DOCKER_HOST or the default socket); when
none does, it starts its own `dockerd` (vfs storage, no iptables, no bridge: containers
use the host network) with its socket and run state in a temporary directory, and stops
it at the end of the session, with every container it ran.

Its data root is kept between runs (`LATENCY_SIDECAR_DOCKER_ROOT`, by default
`~/.cache/latency-sidecar/docker`) so that the images prepared by
`deploy/testing/local-images.sh` (a debootstrapped base tagged as the Dockerfile's FROM,
Debian stand-ins for redis / prometheus / alertmanager) are built once, not every run.

`sidecar_image` builds the product's Dockerfile as it is, tagged as deploy/compose.yaml
names it. Figures (time to prepare, build, image size, ...) are printed at the end of
the session.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LOCAL_IMAGES = DEPLOY / "testing" / "local-images.sh"
DATA_ROOT = Path(
    os.environ.get("LATENCY_SIDECAR_DOCKER_ROOT")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "latency-sidecar"
    / "docker"
)
# what this suite's containers carry, so that it removes only its own from an engine
# it shares with others
LABEL = "latency-sidecar.test=1"
FIGURES: dict[str, str] = {}


@dataclass
class Docker:
    client: str
    env: dict[str, str]
    own: bool  # an engine this session started (and stops)

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [self.client, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.stdout}{out.stderr}")
        return out

    async def arun(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        """`docker ...` without blocking the event loop (tests serve HTTP meanwhile)."""
        proc = await asyncio.create_subprocess_exec(
            self.client,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    def remove_our_containers(self) -> None:
        ids = self.run("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        if self.own:  # the whole engine is ours: whatever a crashed run left behind
            ids = self.run("ps", "-aq", check=False).stdout.split()
        if ids:
            self.run("rm", "-f", "-v", *ids, check=False, timeout=120)


def _client() -> str:
    # the client that ships with the engine we may start, else the one on PATH
    for path in ("/usr/bin/docker", shutil.which("docker")):
        if path and os.access(path, os.X_OK):
            return path
    raise AssertionError("docker client missing (scripts/install-test-tools.sh installs docker.io)")


def _answers(client: str, env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(
            [client, "version", "--format", "{{.Server.Version}}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _unmount_under(*dirs: Path) -> None:
    """dockerd leaves mounts behind (its netns, the data root bind); deepest first."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(points, key=len, reverse=True):
        if any(point == str(d) or point.startswith(f"{d}/") for d in dirs):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _start_dockerd(run_dir: Path) -> subprocess.Popen[bytes]:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if os.geteuid() != 0 or not os.access(dockerd, os.X_OK):
        raise AssertionError(
            "no Docker engine answers and this session cannot start one: run as root with "
            "Debian's docker.io installed (scripts/install-test-tools.sh), or set DOCKER_HOST"
        )
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "dockerd.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [
            dockerd,
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            f"--host=unix://{run_dir}/docker.sock",
            f"--data-root={DATA_ROOT}",
            f"--exec-root={run_dir}/exec",
            f"--pidfile={run_dir}/docker.pid",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def _stop_dockerd(proc: subprocess.Popen[bytes], run_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _unmount_under(run_dir, DATA_ROOT)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Docker]:
    client = _client()
    # BuildKit, as every current Docker builds (the legacy builder commits a container
    # per instruction: with vfs, a full copy each)
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    if _answers(client, env):
        docker = Docker(client, env, own=False)
        yield docker
        docker.remove_our_containers()
        return
    # one session at a time on the shared data root (another worktree's run waits here)
    DATA_ROOT.parent.mkdir(parents=True, exist_ok=True)
    lock = open(DATA_ROOT.parent / "docker.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    # short: the engine's unix sockets live under it (108-byte path limit)
    run_dir = Path(tempfile.mkdtemp(prefix="lsd-", dir="/tmp"))
    proc = _start_dockerd(run_dir)
    env["DOCKER_HOST"] = f"unix://{run_dir}/docker.sock"
    docker = Docker(client, env, own=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(client, env):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (run_dir / "dockerd.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"dockerd did not start:\n{log}")
            time.sleep(0.5)
        docker.remove_our_containers()  # left by a run that was killed
        docker.run("volume", "prune", "-f", check=False)
        yield docker
    finally:
        docker.remove_our_containers()
        docker.run("volume", "prune", "-f", check=False)
        # images a rebuild replaced (the cache keeps only what is tagged)
        docker.run("image", "prune", "-f", check=False, timeout=300)
        _stop_dockerd(proc, run_dir)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


@pytest.fixture(scope="session")
def local_images(docker_engine: Docker) -> Docker:
    """The base and the stack's stand-ins, built once (kept in the data root)."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(LOCAL_IMAGES)],
        env={**docker_engine.env, "DOCKER": docker_engine.client},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    built = [
        line for line in out.stderr.splitlines() if "debootstrap" in line or "building" in line
    ]
    FIGURES["prepare images (local-images.sh)"] = f"{time.monotonic() - t0:.1f} s" + (
        f" (built: {len(built)})" if built else " (cached)"
    )
    return docker_engine


def compose_image_tag() -> str:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return str(doc["x-sidecar-image"]["image"])


@pytest.fixture(scope="session")
def sidecar_image(local_images: Docker) -> str:
    """The product's Dockerfile, built as it is (host network: pip reaches PyPI)."""
    tag = compose_image_tag()
    t0 = time.monotonic()
    local_images.run("build", "-q", "--network", "host", "-t", tag, str(ROOT), timeout=1200)
    FIGURES["docker build"] = f"{time.monotonic() - t0:.1f} s"
    return tag


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("container figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
