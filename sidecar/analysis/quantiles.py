"""Exact quantiles of client samples and how far they can be trusted.

A quantile estimated from n samples is an order statistic. Whatever the distribution,
``P(X_(k) <= true q-quantile) = P(Binomial(n, q) >= k)``, so binomial tails give
distribution-free confidence bounds. A gate says "over" only when the lower bound is
above the limit, "within" only when the upper bound is at or below it, and otherwise
"inconclusive": with 21 samples the p95 is the 20th value and no verdict is honest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

NORMAL_ABOVE = 200_000  # past this many samples the binomial is taken as normal


def quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (the ceil(q*n)-th smallest)."""
    if not ordered:
        raise ValueError("no samples")
    k = max(1, math.ceil(q * len(ordered)))
    return ordered[k - 1]


def _binom_cdf(n: int, q: float) -> list[float]:
    """cdf[k] = P(Binomial(n, q) <= k), k = 0..n."""
    logq, log1q = math.log(q), math.log1p(-q)
    lgn = math.lgamma(n + 1)
    out: list[float] = []
    acc = 0.0
    for k in range(n + 1):
        acc += math.exp(lgn - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * logq
                        + (n - k) * log1q)  # fmt: skip
        out.append(min(acc, 1.0))
    return out


def rank_bounds(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks (lo, hi) with P(X_(lo) <= Q_q) >= confidence and
    P(X_(hi) >= Q_q) >= confidence; None where even the extreme sample is not enough."""
    if n <= 0:
        return None, None
    if n > NORMAL_ABOVE:
        sd = math.sqrt(n * q * (1 - q))
        z = _z(confidence)
        low = math.floor(n * q - z * sd)
        high = math.ceil(n * q + z * sd) + 1
        return (low if low >= 1 else None), (high if high <= n else None)
    cdf = _binom_cdf(n, q)
    lo: int | None = None
    for k in range(n, 0, -1):  # largest k with P(B >= k) = 1 - cdf[k-1] >= confidence
        if 1 - cdf[k - 1] >= confidence:
            lo = k
            break
    hi: int | None = None
    for k in range(1, n + 1):  # smallest k with P(B <= k-1) >= confidence
        if cdf[k - 1] >= confidence:
            hi = k
            break
    return lo, hi


def _z(confidence: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < confidence:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class Estimate:
    q: float
    n: int
    value: float
    low: float | None  # confidence bounds of the true quantile (None: too few samples)
    high: float | None
    confidence: float

    @property
    def half_width(self) -> float | None:
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2

    def as_json(self) -> dict[str, object]:
        return {"q": self.q, "n": self.n, "value_ms": round(self.value, 3),
                "low_ms": None if self.low is None else round(self.low, 3),
                "high_ms": None if self.high is None else round(self.high, 3),
                "confidence": self.confidence}  # fmt: skip


def estimate(ordered: Sequence[float], q: float, confidence: float = 0.99) -> Estimate:
    lo, hi = rank_bounds(len(ordered), q, confidence)
    return Estimate(
        q, len(ordered), quantile(ordered, q),
        None if lo is None else ordered[lo - 1], None if hi is None else ordered[hi - 1],
        confidence,
    )  # fmt: skip


def verdict(est: Estimate, limit: float) -> str:
    """'over' / 'within' / 'inconclusive' against a limit on the true quantile."""
    if est.low is not None and est.low > limit:
        return "over"
    if est.high is not None and est.high <= limit:
        return "within"
    return "inconclusive"


def explain(est: Estimate, limit: float, name: str) -> str:
    pct = f"p{est.q * 100:g}"
    low = "-" if est.low is None else f"{est.low:.1f}"
    high = "-" if est.high is None else f"{est.high:.1f}"
    band = f"{est.confidence:.0%} bounds {low}..{high} ms, n={est.n}"
    v = verdict(est, limit)
    if v == "over":
        return f"{name}: {pct} {est.value:.1f} ms > {limit:g} ms ({band})"
    if v == "within":
        return f"{name}: {pct} {est.value:.1f} ms <= {limit:g} ms ({band})"
    return (f"{name}: {pct} {est.value:.1f} ms, no verdict against {limit:g} ms: too few "
            f"samples to tell ({band})")  # fmt: skip
