"""Per-request timings and the latency / throughput summary every multi-NPC system reports."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """One NPC reply: when it was submitted and when each generated token became available."""

    submitted: float  # time.perf_counter()
    token_times: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(timings: list[RequestTiming]) -> dict[str, float]:
    """Aggregate decode tokens/s over the whole run, TTFT p50/p95 and inter-token latency p50/p99 (ms)."""
    start = min(t.submitted for t in timings)
    end = max(t.token_times[-1] for t in timings if t.token_times)
    tokens = sum(len(t.token_times) for t in timings)
    ttft = [(t.token_times[0] - t.submitted) * 1000 for t in timings if t.token_times]
    itl = [(b - a) * 1000 for t in timings for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    return {
        "tok_s": tokens / (end - start),
        "ttft_p50_ms": _percentile(ttft, 0.5),
        "ttft_p95_ms": _percentile(ttft, 0.95),
        "itl_p50_ms": _percentile(itl, 0.5),
        "itl_p99_ms": _percentile(itl, 0.99),
        "tokens": tokens,
    }
