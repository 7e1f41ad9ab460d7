"""Accuracy of the percentile engine (issue 3): property tests against exact order
statistics, merge, and window expiry."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.percentiles import QUANTILES, Percentiles
from sidecar.record import TimingRecord
from sidecar.sketch import MAX_VALUE, MIN_VALUE, LogHistogram
from sidecar.window import RollingHistogram, SubWindow

from .exact import exact

ACC = 0.01 + 1e-9
QS = (*QUANTILES, 0.0, 1.0)


def assert_within_1pct(values: list[float], hist: LogHistogram) -> None:
    for q, got in zip(QS, hist.quantiles(QS), strict=True):
        want = exact(values, q)
        assert abs(got - want) <= ACC * want, (q, got, want)


def lognormal(rng: random.Random, n: int, mu: float = math.log(0.05), sigma: float = 0.6):
    return [min(MAX_VALUE, max(MIN_VALUE, rng.lognormvariate(mu, sigma))) for _ in range(n)]


def bimodal(rng: random.Random, n: int):
    # 95% fast (~20 ms), 5% slow (~2 s): what LLM traffic looks like
    return [
        rng.lognormvariate(math.log(2.0), 0.3)
        if rng.random() < 0.05
        else rng.lognormvariate(math.log(0.02), 0.2)
        for _ in range(n)
    ]


def pareto(rng: random.Random, n: int):
    return [min(MAX_VALUE, 0.001 * rng.paretovariate(1.2)) for _ in range(n)]


seeds = st.integers(min_value=0, max_value=2**32 - 1)
sizes = st.integers(min_value=1, max_value=3000)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, n=sizes, kind=st.sampled_from([lognormal, bimodal, pareto]))
def test_quantiles_within_one_percent(seed, n, kind):
    values = kind(random.Random(seed), n)
    h = LogHistogram()
    for v in values:
        h.add(v)
    assert_within_1pct(values, h)
    assert h.quantiles([1.0])[0] == max(values)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=MIN_VALUE, max_value=MAX_VALUE), min_size=1))
def test_any_values_in_range(values):
    h = LogHistogram()
    for v in values:
        h.add(v)
    assert_within_1pct(values, h)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, n1=sizes, n2=sizes)
def test_merge_equals_histogram_of_union(seed, n1, n2):
    rng = random.Random(seed)
    a_vals, b_vals = lognormal(rng, n1), bimodal(rng, n2)
    a, b, union = LogHistogram(), LogHistogram(), LogHistogram()
    for v in a_vals:
        a.add(v)
        union.add(v)
    for v in b_vals:
        b.add(v)
        union.add(v)
    a.merge(b)
    assert a.counts == union.counts and a.count == union.count and a.max == union.max
    assert_within_1pct(a_vals + b_vals, a)


def _sub(values: list[float]) -> SubWindow:
    from sidecar.sketch import bucket_of

    s = SubWindow()
    for v in values:
        s.add(bucket_of(v), v)
    return s


def test_values_leave_the_window_on_time():
    w = RollingHistogram(10)
    w.push(_sub([0.5] * 100))  # t = 1
    for _ in range(8):  # t = 2..9: still inside the 10 s window
        w.push(None)
        assert w.count == 100
    w.push(None)  # t = 10: the first second is now 10 s old
    assert w.count == 0 and w.empty


def test_regime_shift_followed_within_one_sub_window():
    """60 s of 10 ms, then a jump to 500 ms: once the old values age out the p50 is
    the new regime; p99 follows as soon as > 1% of the window is slow."""
    w = RollingHistogram(60)
    for _ in range(60):
        w.push(_sub([0.010] * 50))
    p50, p99 = w.quantiles((0.5, 0.99))
    assert abs(p50 - 0.010) <= ACC * 0.010
    w.push(_sub([0.5] * 50))  # one second of the new regime (1/60 of the window)
    assert abs(w.quantiles((0.99,))[0] - 0.5) <= ACC * 0.5
    for _ in range(59):
        w.push(_sub([0.5] * 50))
    assert abs(w.quantiles((0.5,))[0] - 0.5) <= ACC * 0.5
    assert w.max == 0.5


def test_long_window_uses_coarser_slots_with_bounded_memory():
    w = RollingHistogram(300)
    assert w.ticks_per_slot == 5 and len(w._slots) == 60
    for _ in range(300):
        w.push(_sub([0.1]))
    assert w.count in range(295, 301)


def _rec(route: str, latency: float, stream: bool = False, ttfb: float | None = None):
    return TimingRecord(
        start=0.0,
        sent_at=0.0,
        headers_at=0.0,
        upstream_end=latency,
        first_byte_at=ttfb,
        end=latency,
        wall=0.0,
        method="GET",
        route=route,
        status=200,
        bytes_in=0,
        bytes_out=1,
        stream=stream,
        request_id="r",
        trace_id=None,
        error=None,
        latency=ttfb if stream and ttfb is not None else latency,
    )


def test_observer_keeps_routes_star_and_streams_apart():
    p = Percentiles([60, 300])
    for _ in range(10):
        p.observe(_rec("/a", 0.010))
        p.observe(_rec("/b", 0.100))
        p.observe(_rec("/a", 30.0, stream=True, ttfb=0.2))  # ttfb counts, not duration
    p.tick()
    doc = p.snapshot().as_json()
    assert doc["windows_s"] == [60, 300]
    assert doc["routes"]["/a"]["60"]["count"] == 10
    assert abs(doc["routes"]["/a"]["60"]["p50_ms"] - 10) <= 0.1
    assert doc["routes"]["*"]["60"]["count"] == 20
    assert doc["streams"]["/a"]["60"]["count"] == 10
    assert abs(doc["streams"]["/a"]["300"]["p99_ms"] - 200) <= 2
    assert "/a" not in doc["streams"] or doc["streams"]["/a"]["60"]["max_ms"] < 1000
    assert set(doc["routes"]["/a"]["60"]) == {
        "count",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
    }
