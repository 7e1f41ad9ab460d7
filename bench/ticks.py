"""Python bytecodes per busy second of the once-a-second work: deterministic.

The latency percentiles' tick, with what is linked to it (the anatomy's windows), after
a second of ``--rate`` unary requests on one route (seeded lognormal times, fed
straight to the observers, no network), averaged over seconds 11..70 so that windows
expire too. Counts bytecodes with `sys.settrace` (opcode events): the same on any
machine, unlike a timer. Under callgrind a request takes milliseconds, so a busy
second's work weighs in `bench/instructions.py`'s per-request figure; this isolates
it. Runs against another checkout with ``PYTHONPATH=<its root>`` (builds before the
anatomy have no anatomy to link).

    python bench/ticks.py [--rate 200]
"""

from __future__ import annotations

import argparse
import random
import sys
from types import FrameType
from typing import Any

from sidecar.metrics import Metrics, RequestMetrics
from sidecar.percentiles import Percentiles
from sidecar.record import TimingRecord

BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
WINDOWS = [60, 300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=200, help="requests per second")
    args = parser.parse_args()
    metrics = Metrics(BUCKETS)
    observer = RequestMetrics(metrics)
    percentiles = Percentiles(WINDOWS)
    try:
        from sidecar.anatomy.metrics import AnatomyMetrics
        from sidecar.anatomy.observer import Anatomy
    except ImportError:
        print("no latency anatomy in this build")
    else:
        Anatomy(WINDOWS, AnatomyMetrics(metrics, BUCKETS)).link(percentiles, observer.route_series)
    rng = random.Random(1)
    opcodes = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal opcodes
        frame.f_trace_opcodes = True
        if event == "opcode":
            opcodes += 1
        return tracer

    total = 0
    for second in range(70):
        for i in range(args.rate):
            start = second + i / args.rate
            sent = start + rng.lognormvariate(-10, 0.5)
            headers_at = sent + rng.lognormvariate(-4, 0.5)
            upstream_end = headers_at + 0.0001
            end = upstream_end + rng.lognormvariate(-10, 0.5)
            record = TimingRecord(
                start, sent, headers_at, upstream_end, headers_at, end, 0.0, "POST",
                "/v1/chat/completions", 200, 10, 100, False, "r", None, None, end - start,
            )  # fmt: skip
            observer.observe(record)
            percentiles.observe(record)
        opcodes = 0
        sys.settrace(tracer)
        percentiles.tick()
        sys.settrace(None)
        if second >= 10:
            total += opcodes
    print(f"{total / 60:,.0f} bytecodes per busy second ({args.rate} requests/s, one route)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
