"""Cost of the observers on the hot path and of percentile queries.

    python bench/engine.py

Prints µs per recorded request (percentile engine alone, metrics alone, both) and µs
per percentile query (one route, one window), plus the tick cost for 100 routes.
"""

from __future__ import annotations

import random
import time

from sidecar.metrics import Metrics, RequestMetrics
from sidecar.percentiles import QUANTILES, Percentiles
from sidecar.record import TimingRecord
from sidecar.window import RollingHistogram, SubWindow

N = 200_000


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


if __name__ == "__main__":
    main()
