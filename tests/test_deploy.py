"""Deployment artifacts checked by real tools, offline (issue 6)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar import __version__

from .binaries import prometheus

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = K8S / "dashboards" / "latency-sidecar.json"
BIN = Path(sys.executable).parent
# 1.30: the gateway's preStop `sleep` action (PodLifecycleSleepAction) is on by default
K8S_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0"]


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} missing (installed by `make test` / .ci/run)"
    return str(path)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_dockerfile_passes_hadolint_and_has_the_essentials():
    out = run(tool("hadolint"), str(ROOT / "Dockerfile"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) == 2 and all(re.search(r":\d+\.\d+\.\d+-slim", s) for s in stages)
    final = text.split("\nFROM ")[-1]
    assert "gcc" not in final and "build-essential" not in final
    assert re.search(r"^USER 10001", final, re.M)
    assert re.search(r"^EXPOSE 8000 9901 6060", final, re.M)
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'ENTRYPOINT ["latency-sidecar"]' in final and 'CMD ["run"]' in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", "bench", ".venv", "**/__pycache__"} <= set(ignored)


def kustomize() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = run(kubectl, "kustomize", str(K8S))
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    # no kubectl: the same resources, and the generated dashboard ConfigMap by hand
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for r in kust["resources"] for d in yaml.safe_load_all((K8S / r).read_text())]
    gen = kust["configMapGenerator"][0]
    docs.append({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": gen["name"], "labels": gen["options"]["labels"]},
        "data": {Path(f).name: (K8S / f).read_text() for f in gen["files"]},
    })  # fmt: skip
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return kustomize()


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and "dashboard" not in d["metadata"]["name"]]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(manifests, version, tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    out = run(tool("kubernetes-validate"), "--strict", "-k", version, str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("deployment/gateway", "service/gateway", "configmap/latency-sidecar"):
        assert f"passed for resource {name}" in out.stdout + out.stderr


def test_pod_structure_the_schema_cannot_check(manifests):
    dep = by_kind(manifests, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar, k8s >= 1.29
    (gateway,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": 8000, "admin": 9901}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):  # fmt: skip
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "admin"
    # the version lives in sidecar/__init__.py; the manifest's image tag follows it
    assert sidecar["image"].rpartition(":")[2] == __version__, sidecar["image"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["SIDECAR_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SIDECAR_PROFILING_ENABLED"]["value"] == "false"
    assert env["SIDECAR_PROFILING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    config = by_kind(manifests, "ConfigMap")["data"]
    assert config["SIDECAR_TARGET_NAME"]
    assert config["SIDECAR_ADMIN_LISTEN"].endswith(":9901")
    assert config["SIDECAR_LISTEN"].endswith(":8000")
    assert config["SIDECAR_UPSTREAM_URL"].endswith(f":{gateway['ports'][0]['containerPort']}")
    for c in (sidecar, gateway):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    grace = float(config["SIDECAR_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace
    # the Service sends clients to the sidecar's port, never straight to the gateway
    svc = by_kind(manifests, "Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    mon = by_kind(manifests, "PodMonitor")
    assert mon["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    assert mon["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    (dash,) = [d for d in manifests if d["metadata"]["name"] == "latency-sidecar-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["latency-sidecar.json"])["uid"] == "latency-sidecar"


def test_prometheusrule_carries_exactly_the_rules_file(manifests):
    rule = by_kind(manifests, "PrometheusRule")
    rules_file = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["spec"] == rules_file


@pytest.mark.tools  # promtool
def test_promtool_checks_and_unit_tests_the_rules():
    promtool = tool("promtool")
    out = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "tests" / "rules_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_is_valid_and_cross_references_hold():
    compose = DEPLOY / "compose.yaml"
    out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose))
    assert out.returncode == 0, out.stdout + out.stderr
    doc = yaml.safe_load(compose.read_text())
    services = doc["services"]
    assert {"gateway", "sidecar", "redis", "prometheus", "alertmanager", "grafana", "traffic",
            "receiver"} <= set(services)  # fmt: skip
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            host = vol.split(":")[0]
            assert (DEPLOY / host).exists(), f"{name} mounts missing {host}"
    for name in ("gateway", "sidecar", "redis", "prometheus", "alertmanager"):
        assert "healthcheck" in services[name], name

    def host_of(url: str) -> str:
        return urllib.parse.urlsplit(url).hostname or ""

    env = services["sidecar"]["environment"]
    for key in ("SIDECAR_UPSTREAM_URL", "SIDECAR_REDIS_URL", "SIDECAR_ALERTMANAGER_URL",
                "SIDECAR_WEBHOOK_URLS"):  # fmt: skip
        assert host_of(env[key]) in services, key
    assert services["sidecar"]["pid"] == "service:gateway"
    # the gateway's entrypoint is PID 1 of the shared namespace (a name would also match
    # the sidecar's own program); tests/test_container.py checks it live
    assert env["SIDECAR_TARGET_PID"] == "1" and "SIDECAR_TARGET_NAME" not in env
    # services built from the image that are not the sidecar must not inherit its
    # HEALTHCHECK (port 9901): traffic has none, the receiver checks its own port
    assert services["traffic"]["healthcheck"] == {"disable": True}
    rx_port = services["receiver"]["command"][services["receiver"]["command"].index("--listen") + 1]
    check = " ".join(services["receiver"]["healthcheck"]["test"])
    assert f"('127.0.0.1', {rx_port.rsplit(':', 1)[1]})" in check
    assert host_of(services["traffic"]["command"][2]) == "sidecar"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for sc in prom["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]
    ]
    assert targets == [f"sidecar:{env['SIDECAR_ADMIN_LISTEN'].rsplit(':', 1)[1]}"]
    assert prom["rule_files"] == ["/etc/prometheus/rules.yml"]
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    hooks = [w["url"] for r in am["receivers"] for w in r.get("webhook_configs", [])]
    assert hooks and all(host_of(u) in services for u in hooks)
    out = run(tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert host_of(ds["datasources"][0]["url"]) == "prometheus"
    panels_uid = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert panels_uid == {"${datasource}"}


# --- the dashboard against a real Prometheus scraping a live sidecar -----------------


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out.append((f"{panel['title']} [{target['refId']}]", target["expr"]))
    return out


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "15s")
        .replace('=~"$instance"', '=~".*"')
        .replace('=~"$route"', '=~".*"')
    )


async def prom_query(client, prom, expr):
    async with client.get(f"{prom}/api/v1/query", params={"query": expr}) as r:
        return await r.json()


def dashboard_variables() -> list[tuple[str, str]]:
    """(series selector, label) of every label_values() template variable."""
    out = []
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var.get("definition", ""))
        if m:
            out.append((m.group(1).replace('=~"$instance"', '=~".*"'), m.group(2)))
    return out


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    upstream, make_sidecar, redis_server, closed_port
):
    """Every panel and variable against two real Prometheus servers scraping the same
    sidecars: one with native histograms on (protobuf scrapes), one classic (text)."""
    up, url = upstream
    sc = await make_sidecar(
        url, redis_url=redis_server.url, target_pid=os.getpid(), eval_interval_s=1, fleet="deploy",
        p95_threshold_ms=20, p99_threshold_ms=30, min_samples=5, windows_s="5,60",
    )  # fmt: skip
    dead = await make_sidecar(f"http://127.0.0.1:{closed_port}")
    targets = [f"127.0.0.1:{sc.admin_port}", f"127.0.0.1:{dead.admin_port}"]
    async with (
        prometheus(targets, job="latency-sidecar") as classic,
        prometheus(targets, "--enable-feature=native-histograms", job="latency-sidecar") as native,
    ):
        proms = {"classic": classic, "native": native}
        async with aiohttp.ClientSession() as client:
            base = f"http://127.0.0.1:{sc.proxy_port}"
            stop = asyncio.Event()

            async def drive():
                paths = ["/sleep/30", "/echo/1", "/status/500", "/slow-stream/20"]
                i = 0
                while not stop.is_set():
                    async with client.get(base + paths[i % len(paths)]) as r:
                        await r.read()
                    async with client.get(f"http://127.0.0.1:{dead.proxy_port}/x") as r:
                        await r.read()
                    async with client.post(  # an LLM stream: tokens, TTFT, TPOT
                        base + "/llm/chat/completions",
                        json={"stream": True, "stream_options": {"include_usage": True}},
                        headers={"X-Test-TTFT-Ms": "5", "X-Test-Gap-Ms": "1"},
                    ) as r:
                        await r.read()
                    i += 1

            drivers = [asyncio.create_task(drive()) for _ in range(4)]
            try:
                async with asyncio.timeout(60):  # both servers up and scraping both
                    for prom in proms.values():
                        while True:
                            try:
                                doc = await prom_query(client, prom, "count(up == 1)")
                                if (
                                    doc["data"]["result"]
                                    and doc["data"]["result"][0]["value"][1] == "2"
                                ):
                                    break
                            except aiohttp.ClientError:
                                pass
                            await asyncio.sleep(0.2)
                t0 = time.monotonic()
                results: dict[tuple[str, str], Any] = {}
                # rate() over 15 s needs a few scrapes of live traffic: poll until every
                # panel has data, for at most 40 s, then judge what we have
                while True:
                    for kind, prom in proms.items():
                        for name, expr in panel_queries():
                            if results.get((kind, name), (None, []))[1]:
                                continue
                            doc = await prom_query(client, prom, substitute(expr))
                            assert doc["status"] == "success", (kind, name, doc)
                            results[(kind, name)] = (doc["status"], doc["data"]["result"])
                    empty = [n for n, (_, res) in results.items() if not res]
                    if not empty or time.monotonic() - t0 > 40:
                        break
                    await asyncio.sleep(1)
            finally:
                stop.set()
                await asyncio.gather(*drivers, return_exceptions=True)
            assert not empty, f"panels without data: {empty}"
            # the native server really holds native histograms (no classic buckets),
            # so its panels above were answered by the native half of each query
            native = await prom_query(
                client, proms["native"], "count(sidecar_request_duration_seconds_bucket)"
            )
            assert native["data"]["result"] == []
            # the template variables resolve too
            variables = [("sidecar_requests_in_flight", "instance"), *dashboard_variables()]
            for prom in proms.values():
                for match, label in variables:
                    async with client.get(
                        f"{prom}/api/v1/label/{label}/values", params={"match[]": match}
                    ) as r:
                        assert (await r.json())["data"], (prom, label)
