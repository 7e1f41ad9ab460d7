"""Load test for an AI gateway, through the sidecar or not.

Mix: chat completions 70%, embeddings 20%, streaming chat 10% (streams are read to the
end; time to first event is reported as its own entry, "chat stream: first event").
Exact, not drawn at random: each user walks the same cycle of ten requests, user n
starting n places before the stream, so even a run of a few dozen requests has every
kind (drawn at random, 41 requests hold no stream 1.3% of the time: a CI flake).

Stages (the seed's k6 suite): ramp up, hold, spike, ramp down — scaled by
``--load-profile``: ``smoke`` (about 30 s, a handful of users) or ``capacity`` (10K req/min:
~170 req/s at the hold). ``--stage-seconds`` and ``--peak-users`` override.

Gate: at the end, the run exits non-zero when the p95 of any request entry exceeds
``--p95-ms`` or the error rate exceeds ``--max-error-rate`` (CI: "fail if P95 > ...").
The p95 is judged on the exact response times with a distribution-free 99% confidence
bound (order statistics, ``sidecar/analysis/quantiles.py``): "over" only when even the
lower bound is above the limit; an entry with too few samples to tell gets no verdict.

With ``--sidecar-admin URL`` the summary (``--summary-file``) puts the client-side
percentiles next to the sidecar's own ``/percentiles`` for the same run.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --load-profile smoke --html loadtest/report.html --sidecar-admin http://127.0.0.1:9901
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from collections import defaultdict
from typing import IO, Any

from locust import HttpUser, LoadTestShape, constant_throughput, events, task
from locust.env import Environment

from sidecar.analysis.load import CHAT_BODY, EMBED_BODY
from sidecar.analysis.quantiles import estimate, explain, verdict

# the same request bodies as `latency-sidecar analyze --rate`
CHAT, EMBED = CHAT_BODY, EMBED_BODY
STREAM_HEADERS = "chat stream: headers"
STREAM_TTFB = "chat stream: first event"
STREAM_TOTAL = "chat stream: whole"

PROFILES = {
    # stage seconds, peak users (each user: 1 request/s)
    "smoke": (6, 8),
    "capacity": (120, 170),
}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--load-profile", choices=sorted(PROFILES), default="smoke")
    parser.add_argument("--stage-seconds", type=float, default=0, help="overrides the profile")
    parser.add_argument("--peak-users", type=int, default=0, help="overrides the profile")
    parser.add_argument("--p95-ms", type=float, default=100.0, help="gate: max p95 per entry")
    parser.add_argument("--max-error-rate", type=float, default=0.01, help="gate: max failures")
    parser.add_argument("--sidecar-admin", default="", help="sidecar admin URL, for /percentiles")
    parser.add_argument("--summary-file", default="", help="write the summary (markdown) here")
    parser.add_argument(
        "--requests-file", default="", help="write every request (JSON lines: t, name, ms, ok)"
    )


# exact response times per entry name (locust's own percentiles are rounded)
TIMES: dict[str, list[float]] = defaultdict(list)
_requests_out: list[IO[str]] = []


@events.request.add_listener
def _record(
    name: str, response_time: float, exception: Any = None, start_time: float | None = None,
    **_: Any,
) -> None:  # fmt: skip
    TIMES[name].append(response_time)
    if _requests_out:
        t = start_time or time.time() - response_time / 1000
        line = {"t": t, "name": name, "ms": response_time, "ok": exception is None}
        _requests_out[0].write(json.dumps(line) + "\n")


@events.test_start.add_listener
def _open_requests_file(environment: Environment, **_: Any) -> None:
    path = getattr(environment.parsed_options, "requests_file", "")
    if path and not _requests_out:
        _requests_out.append(open(path, "w"))  # noqa: SIM115 - closed on quitting


# 7 chat, 2 embeddings, 1 stream, spread out
CYCLE = ("chat", "chat", "embeddings", "chat", "chat_stream", "chat", "chat", "embeddings",
         "chat", "chat")  # fmt: skip
_users = itertools.count()


class GatewayUser(HttpUser):
    wait_time = constant_throughput(1)  # one request per second per user

    def on_start(self) -> None:
        self._at = (CYCLE.index("chat_stream") - next(_users)) % len(CYCLE)

    @task
    def next_request(self) -> None:
        kind = CYCLE[self._at]
        self._at = (self._at + 1) % len(CYCLE)
        getattr(self, kind)()

    def chat(self) -> None:
        self.client.post("/v1/chat/completions", json=CHAT, name="chat")

    def embeddings(self) -> None:
        self.client.post("/v1/embeddings", json=EMBED, name="embeddings")

    def chat_stream(self) -> None:
        start, wall = time.perf_counter(), time.time()
        first: float | None = None
        size = 0
        body = {**CHAT, "stream": True}
        with self.client.post(
            "/v1/chat/completions", json=body, name=STREAM_HEADERS, stream=True,
            catch_response=True,
        ) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            done = False
            for line in resp.iter_lines():
                if not line:
                    continue
                if first is None:
                    first = time.perf_counter()
                size += len(line)
                if line.strip() == b"data: [DONE]":
                    done = True
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            resp.success()
        end = time.perf_counter()
        for name, at in ((STREAM_TTFB, first), (STREAM_TOTAL, end)):
            if at is not None:
                events.request.fire(
                    request_type="SSE", name=name, response_time=(at - start) * 1000,
                    response_length=size, exception=None, context={}, start_time=wall,
                )  # fmt: skip


class Stages(LoadTestShape):
    """ramp up -> hold -> spike (2x) -> hold -> ramp down, one stage each."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner else None
        stage_s, peak = PROFILES[getattr(opts, "load_profile", "smoke")]
        stage_s = getattr(opts, "stage_seconds", 0) or stage_s
        peak = getattr(opts, "peak_users", 0) or peak
        t = self.get_run_time()
        plan = [
            (stage_s, peak, peak / stage_s),  # ramp up
            (2 * stage_s, peak, peak),  # hold
            (2.5 * stage_s, 2 * peak, 4 * peak / stage_s),  # spike
            (3.5 * stage_s, peak, 4 * peak / stage_s),  # back to hold
            (4.5 * stage_s, 1, peak / stage_s),  # ramp down
        ]
        for until, users, rate in plan:
            if t < until:
                return (max(1, int(users)), max(1.0, rate))
        return None


def _sidecar_percentiles(admin: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{admin.rstrip('/')}/percentiles", timeout=5) as r:
            doc: dict[str, Any] = json.load(r)
            return doc
    except OSError:
        return None


MIN_COMPARE = 100  # fewer requests: a p95 is too coarse to compare
ENTRY_ROUTES = {
    "chat": ("routes", "/v1/chat/completions"),
    "embeddings": ("routes", "/v1/embeddings"),
    STREAM_TTFB: ("streams", "/v1/chat/completions"),
}


def summary(env: Environment) -> tuple[str, list[str]]:
    """Markdown summary and the list of gate violations."""
    opts = env.parsed_options
    stats = env.stats
    side = _sidecar_percentiles(opts.sidecar_admin) if opts.sidecar_admin else None
    window = str(side["windows_s"][-1]) if side else ""
    lines = [
        "| entry | requests | failures | client p50 | client p95 | client p99 | "
        "sidecar p50 | sidecar p95 | sidecar p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    violations: list[str] = []
    undecided: list[str] = []
    notes: list[str] = []
    for entry in sorted(stats.entries.values(), key=lambda e: e.name):
        if not entry.num_requests:
            continue
        p50, p95, p99 = (entry.get_response_time_percentile(q) for q in (0.5, 0.95, 0.99))
        times = sorted(TIMES.get(entry.name, ()))
        if times:  # exact, not locust's rounded buckets
            p50, p95, p99 = (estimate(times, q).value for q in (0.5, 0.95, 0.99))
        cols = ["", "", ""]
        where = ENTRY_ROUTES.get(entry.name)
        if side and where:
            s = side[where[0]].get(where[1], {}).get(window, {})
            if s and entry.num_requests < MIN_COMPARE:
                notes.append(f"- {entry.name}: fewer than {MIN_COMPARE} requests, not compared")
            if s:
                cols = [f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}"]
                # client-side includes the network and the client; the sidecar's own
                # view must not be higher, nor far lower
                gap = p95 - s["p95_ms"]
                far = gap < -max(5.0, 0.05 * p95) or gap > max(25.0, 0.5 * s["p95_ms"])
                if far and entry.num_requests >= MIN_COMPARE:
                    notes.append(
                        f"- {entry.name}: client p95 {p95:.1f} ms vs sidecar {s['p95_ms']:.1f}"
                        f" ms differ by more than the proxy's overhead: check clocks, the "
                        f"window ({window} s) and whether other traffic shared the sidecar"
                    )
        lines.append(
            f"| {entry.name} | {entry.num_requests} | {entry.num_failures} | {p50:.1f} | "
            f"{p95:.1f} | {p99:.1f} | " + " | ".join(cols) + " |"
        )
        if entry.name not in (STREAM_TOTAL, STREAM_HEADERS) and times:
            est = estimate(times, 0.95)
            judged = verdict(est, opts.p95_ms)
            if judged == "over":
                violations.append(explain(est, opts.p95_ms, entry.name))
            elif judged == "inconclusive":
                undecided.append("- " + explain(est, opts.p95_ms, entry.name))
    total = stats.total
    error_rate = total.num_failures / total.num_requests if total.num_requests else 0.0
    if error_rate > opts.max_error_rate:
        violations.append(f"error rate {error_rate:.2%} > {opts.max_error_rate:.2%}")
    head = [
        f"# Load test summary ({opts.load_profile})",
        "",
        f"{total.num_requests} requests, {total.num_failures} failures "
        f"({error_rate:.2%}), {total.total_rps:.1f} req/s overall. Sidecar figures: its "
        f"{window or '-'} s rolling window at the end of the run.",
        "",
    ]
    tail = ["", "Gate: " + ("PASSED" if not violations else "FAILED: " + "; ".join(violations))]
    if undecided:
        tail += [
            "",
            "Not judged (the 99% confidence bounds of the p95, from order statistics, "
            "straddle the limit):",
            *undecided,
        ]
    if notes:
        tail += ["", "Client and sidecar comparison:", *notes]
    elif side:
        tail += ["", "Client and sidecar percentiles agree within the proxy's overhead."]
    return "\n".join(head + lines + tail) + "\n", violations


@events.quitting.add_listener
def _gate(environment: Environment, **_: Any) -> None:
    text, violations = summary(environment)
    print(text)
    for fh in _requests_out:
        fh.close()
    path = environment.parsed_options.summary_file
    if path:
        with open(path, "w") as fh:
            fh.write(text)
    # our gate decides, not locust's "any failure -> 1" (the error-rate threshold is the
    # policy for failures)
    environment.process_exit_code = 1 if violations else 0
