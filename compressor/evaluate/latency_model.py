"""Predict the speedup of removing K blocks before removing them.

Latency is modelled per workload as a straight line in the number of blocks kept:
    t(blocks) = fixed + per_block * blocks
`fixed` is what depth does not touch (embeddings, final norm, the LM head, sampling, runtime
overhead); `per_block` is one decoder block. Both are fitted by least squares on measurements
of the same model at several depths (the full model and copies with blocks removed), on one
backend and device.

A workload is one prefill of `prefill_tokens` at batch `batch` plus `new_tokens` decoded tokens:
    workload(blocks) = prefill(blocks) + new_tokens * decode_per_token(blocks)
Because the fixed cost never shrinks, the speedup has a ceiling, full / fixed, that no amount of
pruning reaches (SmolLM2's 49k-word head alone caps it well below depth ratios).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from compressor.adapters import get_adapter
from compressor.blocks import spread_blocks
from compressor.errors import CompressorError, InvalidPlanError
from compressor.evaluate.backends import TorchBackend
from compressor.evaluate.latency import (
    DecodeSpec,
    PrefillSpec,
    TimingConfig,
    decode_trial,
    measure,
    prefill_trial,
)
from compressor.evaluate.stats import percentile
from compressor.surgery.edit import copy_without_blocks
from compressor.util.progress import status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """One request: a prefill of batch x prefill_tokens, then new_tokens decoded one at a time."""

    prefill_tokens: int = 512
    new_tokens: int = 128
    batch: int = 1

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.prefill_tokens}+{self.new_tokens}"


def workload_latency_ms(prefill_ms: float, decode_ms_per_token: float, new_tokens: int) -> float:
    """Latency of one request: the prefill plus every decoded token."""
    return prefill_ms + new_tokens * decode_ms_per_token


@dataclass
class LinearCost:
    """t(blocks) = fixed_ms + per_block_ms * blocks, with the points it was fitted on."""

    fixed_ms: float
    per_block_ms: float
    points: list[list[float]] = field(default_factory=list)  # [blocks kept, ms]

    def at(self, blocks: float) -> float:
        return self.fixed_ms + self.per_block_ms * blocks

    def max_relative_error(self) -> float:
        """Largest |fit - measured| / measured over the fitted points."""
        return max((abs(self.at(b) - t) / t for b, t in self.points), default=0.0)


def fit_line(points: list[tuple[float, float]]) -> LinearCost:
    """Least-squares fixed + per-block cost from (blocks kept, ms) points at two depths or more."""
    if len({b for b, _ in points}) < 2:
        raise CompressorError("fitting a latency model needs measurements at two depths or more")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in points)
    sxy = sum((b - mean_b) * (t - mean_t) for b, t in points)
    slope = sxy / sxx
    return LinearCost(mean_t - slope * mean_b, slope, [[float(b), float(t)] for b, t in points])


@dataclass
class LatencyModel:
    backend: str
    device: str
    blocks: int  # depth of the full model
    workload: Workload
    prefill: LinearCost  # ms per prefill of the workload's shape
    decode: LinearCost  # ms per decoded token
    versions: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    # --- predictions ----------------------------------------------------------------------
    def latency_ms(self, blocks_kept: float) -> float:
        return workload_latency_ms(self.prefill.at(blocks_kept), self.decode.at(blocks_kept),
                                   self.workload.new_tokens)

    @property
    def fixed_ms(self) -> float:
        return self.latency_ms(0)

    @property
    def per_block_ms(self) -> float:
        return self.latency_ms(1) - self.latency_ms(0)

    def predict_speedup(self, k_removed: int) -> float:
        """Full-model latency over the latency with k blocks removed, for the workload."""
        if not 0 <= k_removed < self.blocks:
            raise InvalidPlanError(f"can remove 0 to {self.blocks - 1} blocks, not {k_removed}")
        return self.latency_ms(self.blocks) / self.latency_ms(self.blocks - k_removed)

    def ceiling(self) -> float:
        """The speedup approached as blocks cost nothing: full latency over the fixed cost."""
        fixed = self.fixed_ms
        return math.inf if fixed <= 0 else self.latency_ms(self.blocks) / fixed

    def max_speedup(self) -> float:
        """The speedup with a single block left: the most pruning can actually deliver."""
        return self.predict_speedup(self.blocks - 1)

    def blocks_for_speedup(self, target: float) -> int:
        """The fewest blocks to remove for at least `target` speedup on the workload."""
        for k in range(self.blocks):
            if self.predict_speedup(k) >= target:
                return k
        best = self.max_speedup()
        raise InvalidPlanError(
            f"a {target:.2f}x speedup is out of reach on {self.backend}/{self.device} for "
            f"{self.workload.label}: {self.explain()}; even one block left gives {best:.2f}x. "
            "Ask for less, or shrink the fixed cost (LM head, vocabulary)"
        )

    def explain(self) -> str:
        full = self.latency_ms(self.blocks)
        if self.fixed_ms <= 0:
            return (f"the fit found no fixed cost ({self.fixed_ms:.1f} ms of {full:.1f} ms): the timings are "
                    "too noisy to bound the speedup; measure with more --min-seconds on a quiet machine")
        return (f"fixed cost {self.fixed_ms:.1f} ms of {full:.1f} ms ({self.fixed_ms / full:.0%}, "
                f"embeddings, head and overhead do not shrink with depth), so no pruning exceeds "
                f"{self.ceiling():.2f}x")

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        ceiling = self.ceiling()
        data["ceiling"] = ceiling if math.isfinite(ceiling) else None  # JSON has no infinity
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        return cls(
            backend=data["backend"], device=data["device"], blocks=int(data["blocks"]),
            workload=Workload(**data["workload"]), prefill=LinearCost(**data["prefill"]),
            decode=LinearCost(**data["decode"]), versions=dict(data.get("versions", {})),
            settings=dict(data.get("settings", {})),
        )


def fit_latency_model(prefill_points, decode_points, blocks: int, workload: Workload | None = None,
                      backend: str = "torch", device: str = "cpu", **info) -> LatencyModel:
    """A latency model from (blocks kept, ms) points: prefill ms, and decode ms per token."""
    return LatencyModel(backend, device, blocks, workload or Workload(), fit_line(prefill_points),
                        fit_line(decode_points), **info)


# --- measuring ---------------------------------------------------------------------------------

def measure_latency_model(model: torch.nn.Module, workload: Workload | None = None,
                          removals: tuple[int, ...] | None = None, device: str | None = None,
                          threads: int | None = None, timing: TimingConfig | None = None) -> LatencyModel:
    """Measure `model` on PyTorch at several depths (in alternation) and fit a LatencyModel.

    removals: blocks removed per measured variant (default: 0, a quarter and half the depth).
    Decode is timed token by token over the workload's continuation, the variants alternating.
    """
    workload = workload or Workload()
    timing = timing or TimingConfig()
    n = get_adapter(model).num_blocks(model)
    removals = tuple(sorted(set(removals or (0, n // 4, n // 2))))
    if len(removals) < 2 or removals[-1] >= n:
        raise CompressorError(f"measure at two depths or more, removing fewer than {n} blocks: {removals}")
    variants = [copy_without_blocks(model, spread_blocks(n, k)) for k in removals]
    backends = [TorchBackend(v, device=device, threads=threads) for v in variants]
    try:
        return _measure_depths(backends, n, removals, workload, timing)
    finally:
        for backend in backends:
            backend.close()  # put back the thread count the timing pinned


def _measure_depths(backends, n: int, removals: tuple[int, ...], workload: Workload,
                    timing: TimingConfig) -> LatencyModel:
    kept = [n - k for k in removals]
    prefill_spec = PrefillSpec(workload.batch, workload.prefill_tokens)
    decode_spec = DecodeSpec(workload.batch, workload.prefill_tokens, workload.new_tokens)
    status(f"timing prefill {prefill_spec.label} at depths {kept}")
    prefill = measure([prefill_trial(b, prefill_spec, timing.seed) for b in backends], timing)
    status(f"timing decode {decode_spec.label} at depths {kept}")
    decode = measure([decode_trial(b, decode_spec, timing.seed, timing.warmup_decode_tokens)
                      for b in backends], replace(timing, min_runs=max(timing.min_runs, workload.new_tokens)))
    result = fit_latency_model(
        [(b, median(s)) for b, s in zip(kept, prefill)], [(b, median(s)) for b, s in zip(kept, decode)],
        n, workload, "torch", backends[0].device,
        versions=backends[0].versions(), settings=backends[0].settings(),
    )
    log.info("latency model: %s", result.explain())
    return result


def median(samples: list[float]) -> float:
    return percentile(sorted(samples), 50)


# --- choosing the depth: the fewest blocks whose *measured* speedup reaches a target -------------

def search_depth(first: int, measure, target: float, n: int, max_probes: int = 4,
                 known: dict[int, float] | None = None, trust: float = 0.02, predict=None,
                 scale: float = 1.0) -> int | None:
    """The fewest blocks (of n) whose measured speedup `measure(k)` reaches `target`, starting from
    the guess `first`; None if no probed depth reached it. Each measurement corrects the per-block
    gain (a secant step through 0 blocks = 1.0x), and the next probe lies between the deepest depth
    that fell short and the shallowest that reached the target, so the search goes both ways.
    `known` holds depths measured before the search (they bound it and count as probes).

    The depth just below the shallowest that reached the target is not measured when `predict(k)` (a
    latency model's speedup; without one, the secant through that measurement) falls short by more
    than `trust` (a fraction of the target): the fitted latency model is within about 1 % on the
    backends measured, so such a probe would only confirm the miss, at the price of an export and a
    benchmark. `scale`: what the speedups are relative to (the log shows them times it)."""
    known = dict(known or {})
    short = max((k for k, v in known.items() if v < target), default=0)
    reached = min((k for k, v in known.items() if v >= target), default=None)
    upper = (reached - 1) if reached is not None else n - 1
    if short + 1 > upper:
        return reached
    k = min(max(first, short + 1), upper)
    for _ in range(max_probes - len(known)):
        known[k] = measure(k)
        if known[k] >= target:
            reached = k if reached is None else min(reached, k)
        else:
            short = max(short, k)
        upper = (reached - 1) if reached is not None else n - 1
        guess = secant_guess(k, known[k], target)
        if short + 1 > upper:
            break  # the depths on both sides of the target are measured
        k = min(max(guess, short + 1), upper)  # a guess at or past `reached` checks the depth just below it
        if reached is not None and k == reached - 1:
            predicted = predict(k) if predict else 1 / (1 - _saved_per_block(reached, known[reached]) * k)
            if predicted < target / (1 + trust):
                log.info("%d blocks would give about %.3fx, short of %.3fx: not measured", k, predicted * scale,
                         target * scale)
                break
    return reached


def _saved_per_block(k: int, measured: float) -> float:
    """The latency fraction saved per block, if latency fell linearly with depth from 0 to k blocks."""
    return (1 - 1 / measured) / k


def secant_guess(k: int, measured: float, target: float) -> int:
    """Blocks to remove for `target`, if latency falls linearly with depth as it did from 0 to k blocks."""
    per_block = _saved_per_block(k, measured)
    if per_block <= 0:
        return k + 1
    return math.ceil((1 - 1 / target) / per_block - 1e-9)
