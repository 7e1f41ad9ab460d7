from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidecar.config import ConfigError, load_settings, parse_host_port

GOOD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SIDECAR_"):
            monkeypatch.delenv(key)


def test_defaults_match_spec(monkeypatch):
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "http://127.0.0.1:8080/")
    s = load_settings()
    assert s.upstream_url == "http://127.0.0.1:8080"
    assert str(s.listen) == "0.0.0.0:8000" and str(s.admin_listen) == "0.0.0.0:9901"
    assert s.windows_s == [60, 300] and s.breach_window_s == 60
    assert (s.p95_threshold_ms, s.p99_threshold_ms, s.min_samples) == (100, 250, 20)
    assert s.redis_stream == "sidecar:events" and s.redis_maxlen == 100_000
    assert s.buckets_s[0] == 0.005 and s.buckets_s[-1] == 600
    assert str(s.profiling_listen) == "127.0.0.1:6060" and not s.profiling_enabled
    assert s.log_level == "info" and s.log_format == "json"


def test_lists_parse_from_comma_separated(monkeypatch):
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "http://gw:8080")
    monkeypatch.setenv("SIDECAR_WINDOWS_S", "300, 10,60")
    monkeypatch.setenv("SIDECAR_ROUTES", "/v1/chat/completions,/v1/models/{id}")
    monkeypatch.setenv("SIDECAR_WEBHOOK_URLS", "http://a:1/hook, https://b/x")
    s = load_settings()
    assert s.windows_s == [10, 60, 300] and s.breach_window_s == 10
    assert s.routes == ["/v1/chat/completions", "/v1/models/{id}"]
    assert s.webhook_urls == ["http://a:1/hook", "https://b/x"]


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SIDECAR_UPSTREAM_URL", "ftp://x"),
        ("SIDECAR_LISTEN", "nohost"),
        ("SIDECAR_ADMIN_LISTEN", "1.2.3.4:99999"),
        ("SIDECAR_UPSTREAM_TIMEOUT_S", "-1"),
        ("SIDECAR_WINDOWS_S", "60,abc"),
        ("SIDECAR_P95_THRESHOLD_MS", "0"),
        ("SIDECAR_MIN_SAMPLES", "zero"),
        ("SIDECAR_ROUTES", "v1/no-slash"),
        ("SIDECAR_ROUTES", "/" + "a" * 200),
        ("SIDECAR_ROUTES", "/v1/\x1b[31m"),
        ("SIDECAR_MAX_CONNECTIONS", "0"),
        ("SIDECAR_CLIENT_HEADER_TIMEOUT_S", "0"),
        ("SIDECAR_KEEPALIVE_TIMEOUT_S", "-5"),
        ("SIDECAR_CLIENT_IDLE_TIMEOUT_S", "x"),
        ("SIDECAR_MAX_ROUTES", "0"),
        ("SIDECAR_REDIS_URL", "http://not-redis"),
        ("SIDECAR_WEBHOOK_URLS", "not a url"),
        ("SIDECAR_WEBHOOK_FORMAT", "xml"),
        ("SIDECAR_WEBHOOK_SECRET", "plain"),
        ("SIDECAR_ALERTMANAGER_URL", "am:9093"),
        ("SIDECAR_BUCKETS_S", "1,0.5"),
        ("SIDECAR_TARGET_PID", "-3"),
        ("SIDECAR_PROFILING_ENABLED", "maybe"),
        ("SIDECAR_LOG_LEVEL", "verbose"),
        ("SIDECAR_LOG_FORMAT", "xml"),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "http://gw:8080")
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert var in str(exc.value)


def test_profiling_needs_a_long_token(monkeypatch):
    monkeypatch.setenv("SIDECAR_UPSTREAM_URL", "http://gw:8080")
    monkeypatch.setenv("SIDECAR_PROFILING_ENABLED", "true")
    monkeypatch.setenv("SIDECAR_PROFILING_TOKEN", "short")
    with pytest.raises(ConfigError, match="SIDECAR_PROFILING_TOKEN"):
        load_settings()
    monkeypatch.setenv("SIDECAR_PROFILING_TOKEN", "x" * 32)
    assert load_settings().profiling_enabled


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("0.0.0.0:8000", "0.0.0.0", 8000), (":9", "0.0.0.0", 9), ("[::1]:80", "::1", 80)],
)
def test_host_port(text, host, port):
    assert parse_host_port(text) == (host, port)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_masks_secrets_and_exits_0():
    token = "t0k3n-" + "s" * 40
    out = _cli(
        "check-config",
        env={
            "SIDECAR_UPSTREAM_URL": "http://gw:8080",
            "SIDECAR_WEBHOOK_SECRET": GOOD_SECRET,
            "SIDECAR_PROFILING_ENABLED": "true",
            "SIDECAR_PROFILING_TOKEN": token,
            "SIDECAR_REDIS_URL": "redis://user:hunter2@redis:6379/0",
        },
    )
    assert out.returncode == 0, out.stderr
    assert "SIDECAR_UPSTREAM_URL" in out.stdout and "http://gw:8080" in out.stdout
    for secret in (token, GOOD_SECRET, "hunter2"):
        assert secret not in out.stdout + out.stderr


def test_run_with_bad_config_exits_2_naming_the_variable():
    out = _cli("run", env={"SIDECAR_UPSTREAM_URL": "http://gw:8080", "SIDECAR_MIN_SAMPLES": "x"})
    assert out.returncode == 2
    assert "SIDECAR_MIN_SAMPLES" in out.stderr
    out = _cli("run", env={})
    assert out.returncode == 2
    assert "SIDECAR_UPSTREAM_URL" in out.stderr


def test_cli_overrides_environment():
    out = _cli(
        "check-config",
        "--upstream",
        "http://other:1",
        "--listen",
        "127.0.0.1:1234",
        env={"SIDECAR_UPSTREAM_URL": "http://gw:8080"},
    )
    assert out.returncode == 0
    assert "http://other:1" in out.stdout and "127.0.0.1:1234" in out.stdout
