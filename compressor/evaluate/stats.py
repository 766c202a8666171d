"""Summary statistics of latency samples: a pure function, testable on injected timings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from compressor.errors import CompressorError


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per sample. `tokens_per_s` counts `tokens` tokens per sample (batch x sequence
    for a prefill, batch for one decoding step)."""

    runs: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    n = len(sorted_samples)
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (rank - lo)


def summarize(samples_ms: Sequence[float], tokens: int = 1) -> LatencyStats:
    """Mean, sample standard deviation, percentiles and throughput of latency samples (ms)."""
    samples = sorted(float(s) for s in samples_ms)
    if not samples:
        raise CompressorError("no latency samples were taken: raise --min-runs or --min-seconds")
    n = len(samples)
    mean = math.fsum(samples) / n
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1) if n > 1 else 0.0
    return LatencyStats(
        runs=n,
        mean_ms=mean,
        std_ms=math.sqrt(var),
        min_ms=samples[0],
        p50_ms=percentile(samples, 50),
        p90_ms=percentile(samples, 90),
        p95_ms=percentile(samples, 95),
        p99_ms=percentile(samples, 99),
        max_ms=samples[-1],
        tokens_per_s=tokens * 1000.0 / mean if mean > 0 else math.inf,
    )
