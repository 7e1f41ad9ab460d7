"""Cost of the observers on the hot path and of percentile queries.

    python bench/engine.py [--skip-base2]

Prints µs per recorded request (percentile engine alone, metrics alone, both) and µs
per percentile query (one route, one window), plus the tick cost for 100 routes; µs per
histogram observation (classic only, with native buckets); size and encode time of a
/metrics scrape with 100 routes in text, OpenMetrics and protobuf; and what moving the
percentile engine onto base-2 (native-histogram) buckets would cost and give.
"""

from __future__ import annotations

import math
import random
import sys
import time
from bisect import bisect_right
from itertools import accumulate

from sidecar.metrics import Metrics, RequestMetrics
from sidecar.percentiles import QUANTILES, Percentiles
from sidecar.record import TimingRecord
from sidecar.window import RollingHistogram, SubWindow

N = 200_000
REPEATS = 5  # timings: the best of 5 (the machine is shared)


def records(n: int, routes: int = 20) -> list[TimingRecord]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        lat = rng.lognormvariate(-3, 0.7)
        out.append(
            TimingRecord(
                0.0,
                0.0001,
                lat * 0.9,
                lat * 0.95,
                lat * 0.95,
                lat,
                0.0,
                "POST",
                f"/v1/route{i % routes}",
                200,
                100,
                200,
                False,
                "rid",
                "0af7651916cd43dd8448eb211c80319c" if i % 10 == 0 else None,
                None,
                lat,
            )
        )
    return out


def per_record_us(observer: object, recs: list[TimingRecord]) -> float:
    observe = observer.observe  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for r in recs:
        observe(r)
    return (time.perf_counter() - t0) / len(recs) * 1e6


def main() -> None:
    recs = records(N)
    p = Percentiles([60, 300])
    print(f"percentile engine: {per_record_us(p, recs):.2f} µs per record")
    m = RequestMetrics(Metrics([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]))
    print(f"prometheus metrics: {per_record_us(m, recs):.2f} µs per record")

    # a full window: 60 ticks of 2,000 requests for one route
    w = RollingHistogram(60)
    rng = random.Random(2)
    from sidecar.sketch import bucket_of

    for _ in range(60):
        sub = SubWindow()
        for _ in range(2000):
            v = rng.lognormvariate(-3, 0.7)
            sub.add(bucket_of(v), v)
        w.push(sub)
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        w.quantiles(QUANTILES)
    q_us = (time.perf_counter() - t0) / reps * 1e6
    print(f"query (5 quantiles + max, 120k samples in window): {q_us:.1f} µs per route/window")

    p100 = Percentiles([60, 300])
    for r in records(20_000, routes=100):
        p100.observe(r)
    t0 = time.perf_counter()
    p100.tick()
    first_ms = (time.perf_counter() - t0) * 1000
    for r in records(20_000, routes=100):
        p100.observe(r)
    t0 = time.perf_counter()
    p100.tick()
    tick_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    p100.snapshot()
    snap_ms = (time.perf_counter() - t0) * 1000
    print(
        f"tick with 100 busy routes: {tick_ms:.2f} ms (first, allocating windows: "
        f"{first_ms:.2f} ms); full snapshot: {snap_ms:.2f} ms"
    )


def observe_us() -> None:
    from sidecar.histogram import HistogramSet

    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 0.7) for _ in range(N)]
    buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]

    def best_us(fn: object, trace_id: str | None) -> float:
        best = math.inf
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for v in values:
                fn(v, trace_id)  # type: ignore[operator]
            best = min(best, time.perf_counter() - t0)
        return best / N * 1e6

    for label, schema in (("classic only", None), ("classic + native (schema 5)", 5)):
        observe = HistogramSet("h", "", [], buckets, native_schema=schema).labels().observe
        plain = best_us(observe, None)
        traced = best_us(observe, "0af7651916cd43dd8448eb211c80319c")
        print(f"observe, {label}: {plain:.3f} µs ({traced:.3f} µs with an exemplar)")


def scrape_cost(routes: int = 100) -> None:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    from sidecar.exposition_pb import generate
    from sidecar.metrics import QuantileCollector

    metrics = Metrics([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120])
    observer = RequestMetrics(metrics)
    percentiles = Percentiles([60, 300])
    metrics.registry.register(QuantileCollector(lambda: percentiles.last_snapshot))
    rng = random.Random(4)
    for i in range(100_000):
        lat = rng.lognormvariate(-3, 0.7)
        stream = i % 5 == 0
        r = TimingRecord(
            0.0, 0.0001, lat * 0.9, lat * 0.95, lat * 0.95, lat * (3 if stream else 1), 0.0,
            "POST", f"/v1/route{i % routes}", 500 if i % 50 == 0 else 200, 100, 200, stream,
            "rid", "0af7651916cd43dd8448eb211c80319c" if i % 10 == 0 else None, None, lat,
        )  # fmt: skip
        observer.observe(r)
        percentiles.observe(r)
    percentiles.tick()
    percentiles.snapshot()
    for name, encode in (
        ("text 0.0.4", generate_latest),
        ("OpenMetrics", om_latest),
        ("protobuf (native histograms)", generate),
    ):
        body = encode(metrics.registry)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            encode(metrics.registry)
        ms = (time.perf_counter() - t0) / reps * 1000
        print(f"scrape, {routes} routes, {name}: {len(body) / 1024:.0f} KiB in {ms:.1f} ms")


# --- the percentile engine on base-2 buckets? (a measurement, not the engine) -------------

LOW, HIGH = 1e-5, 3600.0  # the range sketch.py covers


class Base2Layout:
    """Dense base-2 buckets over [LOW, HIGH] at one schema, the sketch's interface."""

    def __init__(self, schema: int) -> None:
        from sidecar.histogram import bucket_index, upper_bound

        self.schema = schema
        self.offset = bucket_index(LOW, schema)
        self.nbuckets = bucket_index(HIGH, schema) - self.offset + 1
        gamma = 2.0 ** (2.0**-schema)
        self.rep = [
            2 * upper_bound(i + self.offset, schema) / (gamma + 1) for i in range(self.nbuckets)
        ]
        self.max_error = (gamma - 1) / (gamma + 1)

        # bucket_of as a closure over locals, as fast as sketch.bucket_of's globals; the
        # index as histogram.NativeHistogramSeries computes it
        factor, offset, last = float(1 << schema), self.offset, self.nbuckets - 1
        log2, ceil = math.log2, math.ceil

        def bucket_of(seconds: float) -> int:
            if seconds <= LOW:
                return 0
            if seconds >= HIGH:
                return last
            return ceil(log2(seconds) * factor) - offset

        self.bucket_of = bucket_of

    def quantiles(self, counts: list[int], total: int, qs: tuple[float, ...]) -> list[float]:
        cumulative = list(accumulate(counts))
        return [
            self.rep[min(bisect_right(cumulative, int(q * (total - 1))), self.nbuckets - 1)]
            for q in qs
        ]


def base2_engine() -> None:
    from sidecar import sketch

    rng = random.Random(5)
    values = [rng.lognormvariate(-3, 0.7) for _ in range(N)]
    layouts: list[tuple[str, object]] = [("sketch.py (DDSketch, 1%)", None)]
    layouts += [(f"base-2 schema {s}", Base2Layout(s)) for s in (5, 6)]
    for name, layout in layouts:
        bucket_of = sketch.bucket_of if layout is None else layout.bucket_of  # type: ignore[attr-defined]
        nbuckets = sketch.NBUCKETS if layout is None else layout.nbuckets  # type: ignore[attr-defined]
        max_err = sketch.RELATIVE_ACCURACY if layout is None else layout.max_error  # type: ignore[attr-defined]
        # record cost: Percentiles.observe's body (bucket + two sparse increments)
        record_us = math.inf
        for _ in range(REPEATS):
            subs: tuple[dict[int, int], dict[int, int]] = ({}, {})
            t0 = time.perf_counter()
            for v in values:
                b = bucket_of(v)
                for counts in subs:
                    counts[b] = counts.get(b, 0) + 1
            record_us = min(record_us, (time.perf_counter() - t0) / N * 1e6)
        # memory: one 60 s window = dense totals + 60 sparse 1 s slots of 2,000 requests
        slots = []
        for i in range(60):
            slot: dict[int, int] = {}
            for v in values[i * 2000 : (i + 1) * 2000]:
                b = bucket_of(v)
                slot[b] = slot.get(b, 0) + 1
            slots.append(slot)
        dense = [0] * nbuckets
        for slot in slots:
            for b, n in slot.items():
                dense[b] += n
        memory = sys.getsizeof(dense) + sum(sys.getsizeof(s) for s in slots)
        entries = sum(len(s) for s in slots) / len(slots)
        # accuracy: worst relative error over many quantiles against the exact ones
        qs = tuple(i / 1000 for i in range(1, 1000))
        window = sorted(values[:120_000])
        if layout is None:
            est = sketch.quantiles_from_counts(dense, len(window), qs)
        else:
            est = layout.quantiles(dense, len(window), qs)  # type: ignore[attr-defined]
        worst = max(
            abs(e - window[sketch.rank_of(q, len(window))]) / window[sketch.rank_of(q, len(window))]
            for q, e in zip(qs, est, strict=True)
        )
        print(
            f"engine on {name}: {record_us:.3f} µs per record (bucket + 2 increments); "
            f"{nbuckets} dense buckets; one 60 s window at 2k req/s {memory / 1024:.0f} KiB "
            f"({entries:.0f} buckets per 1 s slot); worst error {worst:.3%} "
            f"(bound {max_err:.2%})"
        )


if __name__ == "__main__":
    main()
    observe_us()
    scrape_cost()
    if "--skip-base2" not in sys.argv:
        base2_engine()
