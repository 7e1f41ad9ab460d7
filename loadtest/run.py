"""`make loadtest`: the demo gateway behind the sidecar, load from locust, one command.

Starts `latency-sidecar demo-gateway` and `latency-sidecar run` (the same embedded demo
`latency-sidecar analyze` uses: each process binds port 0 and reports its port), runs
loadtest/locustfile.py headless against the sidecar, writes
loadtest/results/report.html (locust's report) and loadtest/results/summary.md
(client vs sidecar percentiles), and exits with locust's code (non-zero on a breach).
Any other option is passed to locust, e.g. ``--load-profile capacity --p95-ms 120``.

To test your own gateway instead, run locust directly:
    locust -f loadtest/locustfile.py --headless --host http://GATEWAY ...
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sidecar.analysis.target import embedded_demo

HERE = Path(__file__).resolve().parent


async def run(argv: list[str], out_dir: Path) -> int:
    async with embedded_demo() as target:
        locust = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
            "--host", target.proxy_url, "--sidecar-admin", target.admin_url,
            "--html", str(out_dir / "report.html"), "--summary-file", str(out_dir / "summary.md"),
            "--only-summary", "--loglevel", "WARNING", *argv,
        )  # fmt: skip
        code = await locust.wait()
    print(f"report: {out_dir / 'report.html'}\nsummary: {out_dir / 'summary.md'}")
    return code


if __name__ == "__main__":
    results = Path(os.environ.get("LOADTEST_RESULTS", HERE / "results"))
    results.mkdir(parents=True, exist_ok=True)
    raise SystemExit(asyncio.run(run(sys.argv[1:], results)))
