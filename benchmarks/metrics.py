"""Per-request timings and the summary figures every system is compared on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestResult:
    """What one request saw. Times are seconds after the start of the run (its first arrival)."""

    id: int
    task: str | None
    arrival_s: float
    first_token_s: float
    finish_s: float
    token_ids: tuple[int, ...]

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method, without numpy)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult]) -> dict:
    """Throughput over the run's span (first arrival to last finish) and latency percentiles."""
    if not results:
        raise ValueError("no results to summarize")
    start = min(r.arrival_s for r in results)
    span = max(r.finish_s for r in results) - start
    tokens = sum(len(r.token_ids) for r in results)
    latencies = [r.latency_s for r in results]
    ttfts = [r.ttft_s for r in results]
    return {
        "requests": len(results),
        "generated_tokens": tokens,
        "wall_s": span,
        "tokens_per_s": tokens / span,
        "requests_per_s": len(results) / span,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "p50_ttft_s": percentile(ttfts, 50),
    }


def ratios(summaries: dict[str, dict], ours: str) -> dict[str, dict]:
    """`ours` over every other system: >1 is better for throughput, <1 is better for latency."""
    mine = summaries[ours]
    out = {}
    for name, theirs in summaries.items():
        if name == ours:
            continue
        out[name] = {
            key: (mine[key] / theirs[key] if theirs[key] else math.nan)
            for key in ("tokens_per_s", "requests_per_s", "p50_latency_s", "p99_latency_s", "p50_ttft_s")
        }
    return out


def agreement(a: list[RequestResult], b: list[RequestResult]) -> float:
    """Share of requests whose greedy tokens are identical in two systems (honesty check, not a gate).

    Random-weight models have near-tied logits, so batch shape alone may flip a rare token.
    """
    by_id = {r.id: r.token_ids for r in b}
    same = sum(1 for r in a if by_id.get(r.id) == r.token_ids)
    return same / len(a) if a else math.nan


def to_dict(result: RequestResult) -> dict:
    return asdict(result) | {"latency_s": result.latency_s, "ttft_s": result.ttft_s}
