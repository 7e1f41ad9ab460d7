"""Settings: every ``SIDECAR_*`` variable of the SPEC, parsed and validated once at start.

`load_settings` is the only entry point: it returns a frozen `Settings` or raises
`ConfigError` whose message names the offending variable(s). The CLI turns that into
exit status 2.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
import resource
import socket
from itertools import pairwise
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from yarl import URL

ENV_PREFIX = "SIDECAR_"
MIN_PROFILING_TOKEN_LEN = 32
DEFAULT_BUCKETS = "0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,120,300,600"


class ConfigError(ValueError):
    """Invalid configuration; the message names the variable."""


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: str) -> HostPort:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces). Port 0 = ephemeral."""
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]*):(\d{1,5})", text)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port {port} out of range 0..65535")
    return HostPort(host, port)


def _split(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value]
    raise ValueError("expected a comma-separated list")


def _check_http_url(value: str) -> str:
    m = re.fullmatch(r"(https?)://([^/\s?#]+)(/[^\s]*)?", value.strip())
    if not m:
        shown = redact_url(value.strip())  # whatever its shape: even without a scheme
        raise ValueError(f"expected an http:// or https:// URL, got {shown!r}")
    try:  # as aiohttp will read it: a bad port, or a password with an unencoded "/"
        URL(value.strip())
    except ValueError as exc:
        shown = redact_url(value.strip())
        raise ValueError(f"invalid URL {shown!r}: {exc}") from None
    return value.strip().rstrip("/")


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """The effective configuration. Field ``x`` is variable ``SIDECAR_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False
    )

    upstream_url: str
    listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:8000")
    admin_listen: Annotated[HostPort, NoDecode] = parse_host_port("0.0.0.0:9901")
    upstream_timeout_s: float = Field(60.0, gt=0)
    max_connections: int | None = Field(None, ge=1)
    client_header_timeout_s: float = Field(10.0, gt=0)
    keepalive_timeout_s: float = Field(75.0, gt=0)
    client_idle_timeout_s: float = Field(60.0, gt=0)
    windows_s: Annotated[list[int], NoDecode] = [60, 300]
    p95_threshold_ms: float = Field(100.0, gt=0)
    p99_threshold_ms: float = Field(250.0, gt=0)
    ttft_p95_threshold_ms: float | None = Field(None, gt=0)  # empty = rule off
    tpot_p95_threshold_ms: float | None = Field(None, gt=0)
    min_samples: int = Field(20, ge=1)
    eval_interval_s: float = Field(5.0, gt=0)
    slow_request_ms: float = Field(1000.0, gt=0)
    routes: CommaList = []
    max_routes: int = Field(100, ge=1)
    redis_url: str = ""
    redis_stream: str = Field("sidecar:events", min_length=1)
    redis_maxlen: int = Field(100_000, ge=1)
    event_buffer: int = Field(10_000, ge=1)
    webhook_urls: CommaList = []
    webhook_format: Literal["json", "alertmanager"] = "json"
    webhook_secret: SecretStr = SecretStr("")
    alertmanager_url: str = ""
    buckets_s: Annotated[list[float], NoDecode] = [float(b) for b in DEFAULT_BUCKETS.split(",")]
    target_pid: int | None = Field(None, ge=1)
    target_name: str = ""
    profiling_enabled: bool = False
    profiling_listen: Annotated[HostPort, NoDecode] = parse_host_port("127.0.0.1:6060")
    profiling_token: SecretStr = SecretStr("")
    shutdown_grace_s: float = Field(20.0, ge=0)
    instance: str = Field(default_factory=socket.gethostname, min_length=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    fleet: str = ""
    breach_scope: Literal["instance", "fleet", "both"] = "instance"

    @field_validator("upstream_url")
    @classmethod
    def _upstream(cls, v: str) -> str:
        url = _check_http_url(v)
        # requests keep their own path: a base path here would be silently dropped
        rest = re.sub(r"^https?://[^/?#]+", "", url)
        if rest:
            raise ValueError(
                "expected scheme://host:port, without a path: requests are forwarded "
                "with their own path"
            )
        return url

    @field_validator("ttft_p95_threshold_ms", "tpot_p95_threshold_ms", mode="before")
    @classmethod
    def _optional_ms(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("alertmanager_url", "redis_url")
    @classmethod
    def _optional_url(cls, v: str, info: Any) -> str:
        v = v.strip()
        if not v:
            return ""
        if info.field_name == "redis_url":
            if not re.fullmatch(r"(redis|rediss|unix)://\S+", v):
                raise ValueError("expected redis://, rediss:// or unix:// URL")
            return v
        return _check_http_url(v)

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _webhooks(cls, v: Any) -> list[str]:
        return [_check_http_url(u) for u in _split(v)]

    @field_validator("routes", mode="before")
    @classmethod
    def _routes(cls, v: Any) -> list[str]:
        routes = _split(v)
        for r in routes:
            if not r.startswith("/"):
                raise ValueError(f"route template {r!r} must start with '/'")
            if len(r) > 128 or not r.isprintable():
                raise ValueError(f"route template {r!r}: at most 128 printable characters")
        return routes

    @field_validator("listen", "admin_listen", "profiling_listen", mode="before")
    @classmethod
    def _host_port(cls, v: Any) -> HostPort:
        return v if isinstance(v, HostPort) else parse_host_port(str(v))

    @field_validator("windows_s", mode="before")
    @classmethod
    def _windows(cls, v: Any) -> list[int]:
        try:
            windows = sorted({int(w) for w in _split(v)})
        except ValueError as exc:
            raise ValueError("expected whole seconds, e.g. 60,300") from exc
        if not windows or windows[0] < 1:
            raise ValueError("need at least one window of >= 1 s")
        return windows

    @field_validator("buckets_s", mode="before")
    @classmethod
    def _buckets(cls, v: Any) -> list[float]:
        try:
            buckets = [float(b) for b in _split(v)]
        except ValueError as exc:
            raise ValueError("expected numbers in seconds, e.g. 0.005,0.01,0.1") from exc
        if not buckets or any(b <= 0 for b in buckets):
            raise ValueError("buckets must be positive")
        if any(a >= b for a, b in pairwise(buckets)):
            raise ValueError("buckets must be strictly increasing")
        return buckets

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if raw:
            if not raw.startswith("whsec_"):
                raise ValueError("expected whsec_<base64>")
            try:
                key = base64.b64decode(raw[len("whsec_") :], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("the part after whsec_ is not valid base64") from exc
            if len(key) < 16:
                raise ValueError("key too short (need >= 16 bytes)")
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        listeners = [("SIDECAR_LISTEN", self.listen), ("SIDECAR_ADMIN_LISTEN", self.admin_listen)]
        if self.profiling_enabled:
            listeners.append(("SIDECAR_PROFILING_LISTEN", self.profiling_listen))
        for i, (name, where) in enumerate(listeners):
            for other, there in listeners[:i]:
                if where.port and where.port == there.port and _overlap(where.host, there.host):
                    raise ValueError(f"{name}: {where} is the same port as {other} ({there})")
        return self

    @field_validator("fleet")
    @classmethod
    def _fleet_name(cls, v: str) -> str:
        v = v.strip()
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError("expected a name of letters, digits, '_', '.', '-' (<= 63)")
        return v

    @model_validator(mode="after")
    def _fleet(self) -> Settings:
        if self.fleet and not self.redis_url:
            raise ValueError("SIDECAR_FLEET: the fleet view shares through Redis; "
                             "set SIDECAR_REDIS_URL too")  # fmt: skip
        if self.breach_scope != "instance" and not self.fleet:
            raise ValueError(f"SIDECAR_BREACH_SCOPE: {self.breach_scope!r} needs SIDECAR_FLEET")
        return self

    @model_validator(mode="after")
    def _profiling(self) -> Settings:
        token = self.profiling_token.get_secret_value()
        if self.profiling_enabled and len(token) < MIN_PROFILING_TOKEN_LEN:
            raise ValueError(
                f"SIDECAR_PROFILING_TOKEN: profiling is enabled, so a token of >= "
                f"{MIN_PROFILING_TOKEN_LEN} characters is required"
            )
        return self

    @property
    def effective_max_connections(self) -> int:
        """SIDECAR_MAX_CONNECTIONS, or 90% of the file-descriptor limit."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(1, int(soft * 0.9))

    @property
    def breach_window_s(self) -> int:
        """Breaches are judged on the shortest window."""
        return self.windows_s[0]

    def masked(self) -> dict[str, str]:
        """Effective settings as ``SIDECAR_X -> text``, secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "********" if value.get_secret_value() else ""
            elif isinstance(value, list):
                text = ",".join(_fmt(v) for v in value)
            elif value is None:
                text = ""
            else:
                text = _fmt(value)
            if name in _URL_FIELDS:
                text = ",".join(redact_url(u) for u in text.split(","))
            out[ENV_PREFIX + name.upper()] = text
        return out


_URL_FIELDS = ("upstream_url", "redis_url", "alertmanager_url", "webhook_urls")
# everything up to the last "@" is taken for credentials: a password may hold an
# unencoded "/", "?", "#" or "@" (over-masking an "@" in a path is the safe mistake)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^\s]*@")
_SECRET_QUERY = re.compile(
    r"([?&](?:[^=&#]*(?:token|secret|password|passwd|pwd|key|sig|signature|auth)[^=&#]*)=)[^&#]*",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` with its credentials masked: the userinfo part and the values of query
    parameters whose names suggest a secret."""
    url = _USERINFO.sub(lambda m: (m.group(1) or "") + "****@", url)
    return _SECRET_QUERY.sub(lambda m: m.group(1) + "****", url)


def _overlap(a: str, b: str) -> bool:
    wildcard = {"0.0.0.0", "::", ""}
    return a == b or a in wildcard or b in wildcard


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """One warning per ``SIDECAR_*`` variable that is not a setting (a typo, usually),
    naming the closest known one."""
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    known |= EXTRA_VARIABLES
    warnings = []
    for var in sorted(env):
        if var.upper().startswith(ENV_PREFIX) and var.upper() not in known:
            close = difflib.get_close_matches(var.upper(), sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{var} is not a latency-sidecar setting and is ignored{hint}")
    return warnings


# SIDECAR_* variables read by commands other than `run` (`analyze`), not by Settings
EXTRA_VARIABLES = frozenset(
    {"SIDECAR_ANALYZE_URL", "SIDECAR_ANALYZE_ADMIN_URL", "SIDECAR_ANALYZE_PROFILING_URL"}
)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment, CLI overrides winning. Raises ConfigError."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc:
            var = ENV_PREFIX + loc[0].upper()
            if err["type"] == "missing":
                msg = "is required"
            lines.append(f"{var}: {msg}")
        else:
            lines.append(msg)
    # one line per bad variable, each naming it (the contract: one line, exit 2)
    return "\n".join(f"invalid configuration: {line}" for line in lines)
