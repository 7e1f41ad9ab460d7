"""Native histograms and the protobuf exposition (issue 12)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections import Counter
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sidecar import promproto as pb
from sidecar.exposition import negotiate
from sidecar.exposition_pb import generate
from sidecar.histogram import (
    ZERO_INDEX,
    ZERO_THRESHOLD,
    HistogramSet,
    NativeHistogramSeries,
    bucket_index,
    native_buckets,
    upper_bound,
)
from sidecar.metrics import NATIVE_HISTOGRAMS

from .binaries import prometheus
from .conftest import Records, serve_app
from .test_deploy import DASHBOARD, DEPLOY
from .test_observability import TRACEPARENT, admin_get
from .upstream import Upstream

PROMETHEUS_2_42_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,"
    "application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROTOBUF = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
)


# --- bucket arithmetic ------------------------------------------------------------------


@given(
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=8),
)
def test_bucket_index_follows_the_prometheus_definition(value, schema):
    """Bucket i holds (2^((i-1)/2^s), 2^(i/2^s)]; exact powers of two are upper bounds."""
    i = bucket_index(value, schema)
    base = 2.0 ** (2.0**-schema)
    lower, upper = upper_bound(i - 1, schema), upper_bound(i, schema)
    # the bounds are floats: allow one part in 1e12 at the edges
    assert lower * (1 - 1e-12) <= value <= upper * (1 + 1e-12), (value, i, lower, upper)
    assert upper / lower == pytest.approx(base, rel=1e-9)
    if math.frexp(value)[0] == 0.5:  # a power of two is the upper bound of its bucket
        assert upper_bound(i, schema) == value


def test_series_counts_every_value_in_its_bucket_zero_negative_inf_and_nan():
    series = NativeHistogramSeries((0.1, 1.0), schema=5, max_buckets=1000)
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 0.6) for _ in range(3000)]
    for v in values:
        series.observe(v)
    for v in (0.0, ZERO_THRESHOLD, -0.25, math.inf, math.nan):
        series.observe(v)
    classic, raw = series.snapshot()
    assert raw is not None
    native = native_buckets(raw)
    assert native is not None and native.schema == 5
    assert sum(classic) == len(values) + 5
    expected = Counter(bucket_index(v, 5) for v in values)
    buckets = native.buckets()
    overflow = (1024 << 5) + 1  # +Inf goes to the bucket above the one of max float64
    assert buckets.pop(overflow) == 1
    assert buckets == expected
    assert native.zero_count == 2
    assert native.negative_spans == [(bucket_index(0.25, 5), 1)] and native.negative_deltas == [1]
    assert native.count == sum(classic) - 1  # NaN counts, in no bucket


def test_bucket_limit_halves_the_resolution_and_keeps_every_count():
    series = NativeHistogramSeries((1.0,), schema=5, max_buckets=40)
    rng = random.Random(4)
    values = [rng.lognormvariate(-3, 1.0) for _ in range(5000)]
    for v in values:
        series.observe(v)
    native = native_buckets(native_counts(series))
    assert native is not None and native.schema < 5
    buckets = native.buckets()
    assert len(buckets) <= 40
    assert buckets == Counter(bucket_index(v, native.schema) for v in values)


def test_take_gained_is_what_finite_positive_and_zero_buckets_gained_since_last_time():
    """What anatomy/unary.py reads once a second: gains between two calls, +Inf,
    negative and NaN left out; nothing when untracked; a resolution change drops
    the second it happened in and the next call answers again."""
    series = NativeHistogramSeries((1.0,), schema=5, max_buckets=40)
    series.observe(0.5)
    assert series.take_gained() is None  # not tracked
    series.track()
    assert series.take_gained() == (5, {})
    for v in (0.5, 0.5, 0.003, 0.0, -1.0, math.inf, math.nan):
        series.observe(v)
    assert series.take_gained() == (
        5, {bucket_index(0.5, 5): 2, bucket_index(0.003, 5): 1, ZERO_INDEX: 1}
    )  # fmt: skip
    assert series.take_gained() == (5, {})
    rng = random.Random(5)
    for _ in range(2000):  # past 40 buckets: the resolution halves
        series.observe(rng.lognormvariate(-3, 1.0))
    assert series.take_gained() is None
    series.observe(0.5)
    schema, gained = series.take_gained() or (None, None)
    assert schema is not None and schema < 5
    assert gained == {bucket_index(0.5, schema): 1}


@given(
    st.dictionaries(st.integers(-120, 300), st.integers(1, 10**6), max_size=60)
)  # 2^-128: zero bucket
def test_spans_and_deltas_round_trip(buckets):
    series = NativeHistogramSeries((), schema=0, max_buckets=10**6)
    for index, n in buckets.items():
        for _ in range(n % 7 + 1):
            series.observe(upper_bound(index, 0))
    native = native_buckets(native_counts(series))
    assert native.buckets() == {i: n % 7 + 1 for i, n in buckets.items()}
    for offset, length in native.positive_spans[1:]:
        assert offset > 2 and length > 0  # gaps of up to 2 are carried as zeros


# --- content negotiation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (PROMETHEUS_2_42_ACCEPT, pb.CONTENT_TYPE),
        (
            f"{PROTOBUF};q=0.5,application/openmetrics-text;version=1.0.0;q=0.6",
            "application/openmetrics-text",
        ),
        (f"text/plain;q=0.3,{PROTOBUF};q=0.4", pb.CONTENT_TYPE),
        (
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text",
            "text/plain",
        ),
        ("application/vnd.google.protobuf", "text/plain"),
        (f"{PROTOBUF};q=0", "text/plain"),
        (f"{PROTOBUF};q=nonsense,text/plain;q=0.1", "text/plain"),
        ("application/openmetrics-text; version=1.0.0", "application/openmetrics-text"),
        ("", "text/plain"),
        ("image/png", "text/plain"),
    ],
)
def test_negotiation_picks_the_highest_q_we_serve(accept, expected):
    _, content_type = negotiate(accept)
    assert content_type.startswith(expected), content_type


# --- the protobuf body against the text exposition ---------------------------------------


def native_counts(series) -> Any:
    counts = series.snapshot()[1]
    assert counts is not None, "not a native series"
    return counts


def decode(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in pb.decode_delimited(body)}


def type_name(family) -> Any:
    return family.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[family.type].name


def text_series(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def protobuf_series(families) -> dict[tuple[str, tuple], float]:
    """The samples a text exposition would carry, rebuilt from the protobuf families."""
    out: dict[tuple[str, tuple], float] = {}
    for f in families.values():
        for m in f.metric:
            labels = tuple(sorted((lp.name, lp.value) for lp in m.label))
            kind = type_name(f)
            if kind in ("COUNTER", "GAUGE", "UNTYPED"):
                value = getattr(m, kind.lower()).value
                out[(f.name, labels)] = value
            elif kind == "SUMMARY":
                out[(f.name + "_count", labels)] = m.summary.sample_count
                out[(f.name + "_sum", labels)] = m.summary.sample_sum
                for q in m.summary.quantile:
                    ql = tuple(sorted((*labels, ("quantile", repr(q.quantile)))))
                    out[(f.name, ql)] = q.value
            elif kind == "HISTOGRAM":
                h = m.histogram
                out[(f.name + "_count", labels)] = h.sample_count
                out[(f.name + "_sum", labels)] = h.sample_sum
                for b in h.bucket:
                    le = "+Inf" if math.isinf(b.upper_bound) else repr(b.upper_bound)
                    out[(f.name + "_bucket", tuple(sorted((*labels, ("le", le)))))] = (
                        b.cumulative_count
                    )
    return out


def text_name(family: str, text_families: dict) -> str:
    """The text-format family name for a protobuf family (counters lose ``_total``)."""
    return family.removesuffix("_total") if family not in text_families else family


async def test_protobuf_carries_every_family_and_native_buckets(proxied):
    up, sc, records, client, base = proxied
    rng = random.Random(5)
    paths = [f"/sleep/{rng.choice([1, 3, 8, 20])}" for _ in range(40)]
    paths += ["/echo/1", "/status/500", "/slow-stream/1"]
    for path in paths:
        async with client.get(f"{base}{path}", headers={"traceparent": TRACEPARENT}) as r:
            await r.read()
    await records.wait_for(len(paths))
    sc.percentiles.tick()
    resp, body = await admin_get(client, sc, "/metrics", headers={"Accept": PROMETHEUS_2_42_ACCEPT})
    assert resp.headers["Content-Type"] == pb.CONTENT_TYPE
    assert resp.headers["Vary"] == "Accept"
    _, text = await admin_get(client, sc, "/metrics")
    families = decode(body)
    text_families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    # every family, with its type
    assert {text_name(n, text_families) for n in families} == set(text_families)
    types = {"counter": "COUNTER", "gauge": "GAUGE", "summary": "SUMMARY", "histogram": "HISTOGRAM"}
    for name, f in families.items():
        tf = text_families[text_name(name, text_families)]
        assert type_name(f) == types.get(tf.type, "UNTYPED"), name
        assert f.help == tf.documentation
    # every series and every count; values that move between the two scrapes (process
    # CPU, memory, gc, lag, in-flight) only need the same series
    moving = (
        "process_",
        "python_gc_",
        "sidecar_event_loop_lag",
        "sidecar_target_",
        "sidecar_requests_in_flight",
    )
    text_values = text_series(text.decode())
    proto_values = protobuf_series(families)
    assert set(proto_values) == set(text_values)
    for key, value in text_values.items():
        if not key[0].startswith(moving):
            assert proto_values[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    assert (
        "sidecar_latency_rolling_seconds_count",
        (("route", "*"), ("stream", "false"), ("window", "60s")),
    ) in proto_values
    # native buckets on the SPEC's histograms only, agreeing with the classic ones
    native = NATIVE_HISTOGRAMS  # the SPEC's
    for name in sorted(native & set(families)):
        for m in families[name].metric:
            h = m.histogram
            assert h.schema == 5 and h.zero_threshold == ZERO_THRESHOLD
            native_total = h.zero_count + sum(
                sum(h.positive_delta[: i + 1]) for i in range(len(h.positive_delta))
            )
            assert native_total == h.sample_count > 0
            assert sum(s.length for s in h.positive_span) == len(h.positive_delta)
    classic = [f for n, f in families.items() if f.type == pb.HISTOGRAM and n not in native]
    assert any(f.metric for f in classic)
    for f in classic:
        for m in f.metric:
            assert not m.histogram.positive_span and not m.histogram.HasField("schema"), f.name
    # the native buckets hold the exact latencies the proxy recorded
    duration = HistogramSet("d", "", [], [], native_schema=5)
    sleeps = [r for r in records.items if r.route == "/sleep/{id}"]
    for r in sleeps:
        duration.labels().observe(r.latency)
    (m,) = [
        m for m in families["sidecar_request_duration_seconds"].metric
        if {(lp.name, lp.value) for lp in m.label} >= {("route", "/sleep/{id}"), ("code", "200")}
    ]  # fmt: skip
    expected = native_buckets(native_counts(duration.labels()))
    assert list(m.histogram.positive_span) == [
        pb.message_class("BucketSpan")(offset=o, length=n) for o, n in expected.positive_spans
    ]
    assert list(m.histogram.positive_delta) == expected.positive_deltas
    # exemplars: on the classic buckets and in the native histogram's own list
    exemplars = [b.exemplar for b in m.histogram.bucket if b.HasField("exemplar")]
    assert exemplars and list(m.histogram.exemplars) == exemplars
    ex = m.histogram.exemplars[0]
    assert [(lp.name, lp.value) for lp in ex.label] == [
        ("trace_id", "0af7651916cd43dd8448eb211c80319c")
    ]
    assert ex.timestamp.seconds > 1_600_000_000 and ex.value > 0


async def test_protobuf_encodes_summaries_counters_and_created_from_any_collector():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary
    from prometheus_client.core import GaugeHistogramMetricFamily, StateSetMetricFamily
    from prometheus_client.registry import Collector

    reg = CollectorRegistry()
    c = Counter("jobs", "Jobs.", ["kind"], registry=reg)
    c.labels("a").inc(3, exemplar={"trace_id": "abc"})
    Gauge("temp", "Temperature.", registry=reg).set(-1.5)
    s = Summary("size_bytes", "Sizes.", registry=reg)
    s.observe(4)
    s.observe(6)
    h = Histogram("wait_seconds", "Waits.", buckets=[1, 2], registry=reg)
    h.observe(1.5)
    Info("build", "Build.", registry=reg).info({"version": "1.2"})

    class Extra(Collector):
        def collect(self):
            g = GaugeHistogramMetricFamily(
                "queue_bytes", "Queue.", buckets=[("1", 2), ("+Inf", 3)], gsum_value=7
            )
            yield g
            yield StateSetMetricFamily("mode", "Mode.", value={"on": True, "off": False})

    reg.register(Extra())
    families = decode(generate(reg))
    assert families["jobs_total"].metric[0].counter.value == 3
    assert families["jobs_total"].metric[0].counter.exemplar.label[0].value == "abc"
    assert families["temp"].metric[0].gauge.value == -1.5
    summary = families["size_bytes"].metric[0].summary
    assert (summary.sample_count, summary.sample_sum) == (2, 10)
    hist = families["wait_seconds"].metric[0].histogram
    assert [(b.upper_bound, b.cumulative_count) for b in hist.bucket] == [
        (1, 0),
        (2, 1),
        (math.inf, 1),
    ]
    assert not hist.positive_span  # a classic histogram stays classic
    assert families["build_info"].metric[0].gauge.value == 1
    assert families["build_info"].metric[0].label[0].value == "1.2"
    gh = families["queue_bytes"]
    assert gh.type == pb.GAUGE_HISTOGRAM and gh.metric[0].histogram.sample_count == 3
    assert {m.label[0].value: m.gauge.value for m in families["mode"].metric} == {"on": 1, "off": 0}


# --- a real Prometheus (2.42, native histograms on) scraping two skewed pods --------------


async def query(client, prom: str, expr: str) -> Any:
    async with client.get(f"{prom}/api/v1/query", params={"query": expr}) as r:
        doc = await r.json()
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


async def wait_for(client, prom: str, expr: str, timeout: float = 60) -> None:
    """Poll until ``expr`` returns something (Prometheus starting, scrapes landing)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await query(client, prom, expr):
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)


def exact_bracket(values: list[float], q: float) -> tuple[float, float]:
    """The two order statistics around the q-quantile of ``values``."""
    s = sorted(values)
    rank = q * (len(s) - 1)
    return s[math.floor(rank)], s[math.ceil(rank)]


def relative_error(estimate: float, bracket: tuple[float, float]) -> float:
    low, high = bracket
    if low <= estimate <= high:
        return 0.0
    return (estimate - high) / high if estimate > high else (estimate - low) / low


def panel_expr(title_prefix: str, ref: str) -> str:
    dash = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dash["panels"] if p["title"].startswith(title_prefix)]
    (target,) = [t for t in panel["targets"] if t["refId"] == ref]
    return str(target["expr"])


@pytest.mark.slow
@pytest.mark.tools
async def test_prometheus_quantiles_of_two_pods_from_native_histograms_are_within_1pct(
    make_sidecar,
):
    """Skewed traffic on two pods: pod A fast and busy, pod B slow. The dashboard's p95/p99
    (native first, classic where native data is absent) against the exact quantiles of
    every latency the two sidecars recorded; a second Prometheus without the feature flag
    gives the classic figures beside them."""
    rng = random.Random(12)
    ups = [Upstream(), Upstream()]
    async with serve_app(ups[0].app()) as url_a, serve_app(ups[1].app()) as url_b:
        pods = [await make_sidecar(url_a), await make_sidecar(url_b)]
        records = [Records(), Records()]
        for sc, rec in zip(pods, records, strict=True):
            sc.proxy.add_observer(rec)
        targets = [f"127.0.0.1:{sc.admin_port}" for sc in pods]
        async with (
            prometheus(targets, "--enable-feature=native-histograms") as native,
            prometheus(targets) as classic,
            aiohttp.ClientSession() as client,
        ):
            path = "/v1/chat/completions"

            async def send(pod: int, n: int, concurrency: int) -> None:
                url = f"http://127.0.0.1:{pods[pod].proxy_port}{path}"

                async def worker(count: int) -> None:
                    for _ in range(count):
                        async with client.post(url, json={}) as r:
                            assert r.status == 200
                            await r.read()

                await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))

            ups[0].delays = [rng.lognormvariate(math.log(0.025), 0.5) for _ in range(3000)]
            ups[1].delays = [rng.lognormvariate(math.log(0.08), 0.4) for _ in range(1000)]
            await asyncio.gather(send(0, 3000, 60), send(1, 1000, 40))
            (route,) = {r.route for r in records[0].items}
            sel = f'route="{route}"'
            count = f"sum(histogram_count(sidecar_request_duration_seconds{{{sel}}})) == 4000"
            await wait_for(client, native, count)
            await wait_for(
                client, classic, f"sum(sidecar_request_duration_seconds_count{{{sel}}}) == 4000"
            )

            latencies = [r.latency for rec in records for r in rec.items]
            assert len(latencies) == 4000
            rows = []
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C")):
                # the panel's query over the cumulative histograms: all the traffic, and
                # no rate() extrapolation, which differs between short-lived series
                expr = panel_expr("Latency p50 / p95 / p99 per route (histograms)", ref)
                expr = re.sub(r"rate\((\w+\{[^}]*\})\[\$__rate_interval\]\)", r"\1", expr)
                expr = expr.replace('=~"$instance"', '=~".*"').replace('=~"$route"', f'="{route}"')
                bracket = exact_bracket(latencies, q)
                n_val = float((await query(client, native, expr))[0]["value"][1])
                c_val = float((await query(client, classic, expr))[0]["value"][1])
                rows.append((q, bracket, n_val, relative_error(n_val, bracket), c_val,
                             relative_error(c_val, bracket)))  # fmt: skip
            report = "\n".join(
                f"p{q * 100:g}: exact {b[0] * 1000:.2f}-{b[1] * 1000:.2f} ms; native "
                f"{n * 1000:.2f} ms ({ne:+.2%}); classic {c * 1000:.2f} ms ({ce:+.2%})"
                for q, b, n, ne, c, ce in rows
            )
            print("\n" + report)
            for *_, n_err, _, _ in rows:
                assert abs(n_err) <= 0.011, report
            # the classic buckets (25/50/100/250 ms here) are tens of percent off
            assert max(abs(r[5]) for r in rows) > 0.05, report

            # the SLO rule's histogram_fraction against the exact share under 100 ms
            fraction = float((await query(client, native,
                f'histogram_fraction(0, 0.1, sum(sidecar_request_duration_seconds{{{sel}}}))'
            ))[0]["value"][1])  # fmt: skip
            exact = sum(v <= 0.1 for v in latencies) / len(latencies)
            assert fraction == pytest.approx(exact, abs=0.005)
            # every recording rule evaluates on native data (promtool 2.42 cannot feed
            # native series to rule unit tests); rate() needs two scrapes of each series
            await wait_for(
                client,
                native,
                f"min(count_over_time(sidecar_request_duration_seconds{{{sel}}}[5m])) > 1",
            )
            rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
            for group in rules["groups"]:
                for rule in group["rules"]:
                    if "record" in rule and not any(
                        x in rule["record"] for x in ("error_ratio", "stream")
                    ):
                        assert await query(client, native, rule["expr"]), rule["record"]
