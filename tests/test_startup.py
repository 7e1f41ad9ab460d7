"""Starting and stopping as a user meets it: clear one-line errors, no tracebacks, no
secrets printed, signals that behave (SPEC "Hostile input": bad configuration and
unusable ports exit 2 with one line naming the variable)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from sidecar.config import ConfigError, load_settings

from .process import ROOT, sidecar_env, spawn_sidecar

TOKEN = "prof-" + "k" * 40


def cli(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")} | env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_line_error(out: subprocess.CompletedProcess[str], variable: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def taken_port():
    """A port held by a listening socket for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_taken_proxy_port_exits_2_naming_the_variable(taken_port):
    out = cli(
        "run", env=sidecar_env("http://127.0.0.1:1", SIDECAR_LISTEN=f"127.0.0.1:{taken_port}")
    )
    one_line_error(out, "SIDECAR_LISTEN")


def test_taken_admin_port_exits_2_naming_the_variable(taken_port):
    out = cli(
        "run", env=sidecar_env("http://127.0.0.1:1", SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{taken_port}")
    )
    one_line_error(out, "SIDECAR_ADMIN_LISTEN")


def test_same_port_for_two_listeners_is_a_config_error():
    env = {
        "SIDECAR_UPSTREAM_URL": "http://gw:8080",
        "SIDECAR_LISTEN": "0.0.0.0:8000",
        "SIDECAR_ADMIN_LISTEN": "127.0.0.1:8000",
    }
    for command in ("check-config", "run"):
        one_line_error(cli(command, env=env), "SIDECAR_ADMIN_LISTEN")
    # different hosts on the same port do not overlap
    env["SIDECAR_LISTEN"] = "127.0.0.2:8000"
    assert cli("check-config", env=env).returncode == 0


def test_demo_with_a_taken_port_exits_2(taken_port):
    # the admin listener on port 0: the default (9901) may be someone else's right now
    out = cli("demo", "--duration", "1", "--listen", f"127.0.0.1:{taken_port}",
              "--admin-listen", "127.0.0.1:0", env={})  # fmt: skip
    one_line_error(out, "SIDECAR_LISTEN")


@pytest.mark.parametrize("command", ["demo-gateway", "demo-receiver"])
def test_demo_servers_with_a_taken_port_exit_2(taken_port, command):
    out = cli(command, "--listen", f"127.0.0.1:{taken_port}", env={})
    one_line_error(out, "--listen")


@pytest.mark.parametrize("command", ["demo-gateway", "demo-receiver"])
@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("nonsense", "expected HOST:PORT, got 'nonsense'"),
        ("[::1]", "expected HOST:PORT, got '[::1]'"),
        ("127.0.0.1:70000", "port 70000 out of range 0..65535"),
    ],
)
def test_demo_servers_with_a_bad_listen_are_a_usage_error(command, listen, message):
    out = cli(command, "--listen", listen, env={})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines()[-1].endswith(f"error: argument --listen: {message}")


def test_bad_configuration_is_one_line_per_variable():
    env = {"SIDECAR_UPSTREAM_URL": "http://gw:8080", "SIDECAR_MIN_SAMPLES": "x"}
    one_line_error(cli("run", env=env), "SIDECAR_MIN_SAMPLES")
    out = cli("run", env={**env, "SIDECAR_EVAL_INTERVAL_S": "-1"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "SIDECAR_MIN_SAMPLES", "SIDECAR_EVAL_INTERVAL_S"
    ], lines  # fmt: skip
    assert all(line.startswith("latency-sidecar: invalid configuration: ") for line in lines)


def test_unknown_variable_is_warned_with_the_closest_name():
    out = cli("check-config", env={"SIDECAR_UPSTREAM_URL": "http://gw:1", "SIDECAR_LISTN": ":1"})
    assert out.returncode == 0
    assert "SIDECAR_LISTN" in out.stderr and "SIDECAR_LISTEN" in out.stderr


@pytest.mark.parametrize("url", ["http://gw:8080/api", "http://gw:8080/v1/", "https://gw/x?y=1"])
def test_upstream_url_with_a_path_is_a_config_error(url):
    # the request's own path is forwarded: a base path would be silently dropped
    one_line_error(cli("check-config", env={"SIDECAR_UPSTREAM_URL": url}), "SIDECAR_UPSTREAM_URL")
    assert cli("check-config", env={"SIDECAR_UPSTREAM_URL": "http://gw:8080/"}).returncode == 0


@pytest.mark.parametrize(
    "url",
    [
        "htp://u:pw-secret@gw:1",
        "u:pw-secret@gw:1",
        "gw:1/x?token=pw-secret",
        # unencoded / ? # @ in a password: the credentials run to the last "@"
        "htps://u:pw/secret@gw:1",
        "u:pw?secret@gw",
        "u:pw#secret@gw:1",
        "htp://u:pw@secret@gw",
        "https://u:pw/secret@hooks.example/x",  # "valid" to a regex, not to aiohttp
    ],
)
@pytest.mark.parametrize("field", ["upstream_url", "webhook_urls", "alertmanager_url"])
def test_credentials_in_invalid_urls_never_printed(url, field):
    with pytest.raises(ConfigError) as err:
        load_settings(**{"upstream_url": "http://gw:1", field: url})
    assert f"SIDECAR_{field.upper()}" in str(err.value)
    assert "secret" not in str(err.value) and "****" in str(err.value), err.value


@pytest.mark.parametrize("variable", ["SIDECAR_UPSTREAM_URL", "SIDECAR_WEBHOOK_URLS"])
def test_credentials_in_an_invalid_url_never_reach_the_terminal(variable):
    env = {"SIDECAR_UPSTREAM_URL": "http://gw:1", variable: "htps://u:pw/secret@gw:1"}
    for command in ("check-config", "run"):
        out = cli(command, env=env)
        one_line_error(out, variable)
        assert "secret" not in out.stdout + out.stderr and "****" in out.stderr


def test_readers_ignore_the_upstream_they_do_not_use(closed_port):
    # `events` reads Redis only: a base path in SIDECAR_UPSTREAM_URL is not its concern
    out = cli("events", "--redis-url", f"redis://127.0.0.1:{closed_port}",
              env={"SIDECAR_UPSTREAM_URL": "http://gw:8080/api"})  # fmt: skip
    assert out.returncode == 2 and "cannot read events from Redis" in out.stderr, out.stderr


def test_credentials_in_urls_never_printed():
    secrets = ("upw-secret", "rpw-secret", "hookpw-secret", "tok-secret", "ampw-secret")
    env = {
        "SIDECAR_UPSTREAM_URL": "http://gw:upw-secret@127.0.0.1:1",
        "SIDECAR_REDIS_URL": "redis://:rpw-secret@127.0.0.1:1/0",
        "SIDECAR_WEBHOOK_URLS": "http://u:hookpw-secret@127.0.0.1:1/h?token=tok-secret",
        "SIDECAR_ALERTMANAGER_URL": "http://am:ampw-secret@127.0.0.1:1",
    }
    out = cli("check-config", env=env)
    assert out.returncode == 0, out.stderr
    assert "127.0.0.1:1" in out.stdout
    for secret in secrets:
        assert secret not in out.stdout + out.stderr


async def test_started_line_and_logs_carry_no_credentials(upstream):
    _, url = upstream
    with_password = url.replace("http://", "http://gw:upw-secret@")
    sc = await spawn_sidecar(
        with_password,
        SIDECAR_WEBHOOK_URLS="http://u:hookpw-secret@127.0.0.1:9/h?token=tok-secret",
        SIDECAR_LOG_LEVEL="debug",
    )
    async with aiohttp.ClientSession() as client, client.get(f"{sc.base}/echo/1") as r:
        assert r.status == 200
    sc.terminate()
    assert await sc.wait() == 0
    logs = sc.stderr.decode()
    assert "sidecar started" in logs
    for secret in ("upw-secret", "hookpw-secret", "tok-secret"):
        assert secret not in logs


async def test_second_signal_exits_at_once(upstream):
    """The first SIGTERM drains (a held request keeps it waiting up to the grace
    period); a second one exits immediately, with 128 + the signal number."""
    up, url = upstream
    sc = await spawn_sidecar(url, SIDECAR_SHUTDOWN_GRACE_S="30")
    up.expect_arrivals = 1
    async with aiohttp.ClientSession() as client:
        held = asyncio.create_task(client.get(f"{sc.base}/hold"))
        await asyncio.wait_for(up.arrived_event.wait(), 10)
        sc.terminate()
        await wait_for_log(sc, b"draining")
        t0 = time.monotonic()
        sc.proc.send_signal(signal.SIGINT)
        code = await sc.wait(10)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
    assert code == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 5
    assert b"second SIGINT" in sc.stderr


async def wait_for_log(sc, text: bytes, timeout: float = 10) -> None:
    """Poll the process's captured stderr (a pipe read by another task) for ``text``."""
    deadline = time.monotonic() + timeout
    while text not in sc.stderr:
        assert time.monotonic() < deadline, f"{text!r} never logged"
        await asyncio.sleep(0.02)


async def test_non_utf8_bearer_on_the_profiling_listener_is_401(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(
        url,
        profiling_enabled=True,
        profiling_token=TOKEN,
        profiling_listen="127.0.0.1:0",
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.profiling_port)
    writer.write(
        b"GET /debug/runtime HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 401")


async def test_no_target_configured_exports_no_target_series(upstream, make_sidecar):
    _, url = upstream
    sc = await make_sidecar(url)
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r,
    ):
        text = await r.text()
    assert "sidecar_target_" not in text
    assert "Server" not in r.headers
