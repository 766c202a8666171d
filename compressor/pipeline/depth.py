"""How many blocks to remove for the target speedup, on top of a precision, *measured* on the target backend.

A first guess from parameter counts (the LM head does not shrink with depth) is measured first: a
copy with that many blocks removed, spread over the depth, exported at the precision and timed
against the original fp32 model in alternation. At fp32 that pair fits the latency model (fixed +
per-block cost on this backend and device), which finds an unreachable target with its ceiling and
makes the next guess; then `latency_model.search_depth` corrects the guess from each probe's own
measurement, both ways, within `max_probes` probes (the first included). On top of a quantized
precision the search runs on speedups relative to that precision's unpruned model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from compressor.adapters import get_adapter
from compressor.blocks import spread_blocks
from compressor.errors import InvalidPlanError
from compressor.evaluate import LatencyModel, Workload, fit_latency_model
from compressor.evaluate.latency_model import parameter_guess, search_depth
from compressor.pipeline.measure import backend_for, measure_speedup
from compressor.pipeline.runner import inputs_of
from compressor.surgery.edit import copy_without_blocks
from compressor.util.progress import status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingInputs:
    """What a latency measurement depends on."""

    backend: str
    device: str
    threads: int | None
    prefill_tokens: int
    new_tokens: int
    batch: int
    timing_seconds: float


@dataclass(frozen=True)
class DepthInputs:
    timing: TimingInputs
    target_speedup: float
    max_probes: int
    speedup_margin: float
    precision: str                  # the precision the blocks are removed on top of


def timing_inputs(cfg) -> TimingInputs:
    return inputs_of(TimingInputs, cfg)


def depth_inputs(cfg, precision: str = "fp32") -> DepthInputs:
    return inputs_of(DepthInputs, cfg, timing=timing_inputs(cfg), precision=precision)


def probe_name(precision: str, k: int) -> str:
    return f"probe-{k}" if precision == "fp32" else f"probe-{precision}-{k}"


def time_depth(run, original, precision: str, k: int, target: float | None = None):
    """(Speedup, its median round's results) of k blocks removed, spread over the depth, at `precision`,
    against the `original` backend."""
    n = get_adapter(run.model).num_blocks(run.model)
    probe = backend_for(run, copy_without_blocks(run.model, spread_blocks(n, k)), probe_name(precision, k), precision)
    return measure_speedup(run, original, probe, target)


def blocks_for_target(run, precision: str = "fp32", base: float = 1.0) -> dict:
    """The fewest blocks whose removal, on top of `precision` (whose unpruned speedup is `base`), reaches
    the target (cached): {"k": blocks or None when out of reach, "attempts": the probes measured,
    "why": why it is out of reach}."""
    name = "blocks" if precision == "fp32" else f"blocks-{precision}"
    return run.runner.cached(name, depth_inputs(run.cfg, precision), lambda: _search(run, precision, base))


def _search(run, precision: str, base: float) -> dict:
    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    original = backend_for(run, run.model, "probe-original")
    attempts: list[dict] = []
    pairs: dict[int, tuple] = {}
    known: dict[int, float] = {}
    fitted: list[LatencyModel] = []

    def measure(k: int) -> float:  # the speedup of k blocks removed, relative to the unpruned model at `precision`
        if k not in known:
            speed, pairs[k] = time_depth(run, original, precision, k, cfg.target_speedup)
            known[k] = speed.value
            predicted = fitted[0].predict_speedup(k) if fitted else None
            attempts.append({"blocks_removed": k, "precision": precision, "predicted": predicted,
                             "measured": speed.value, "spread": speed.spread, "rounds": speed.rounds,
                             "latency_ms": [speed.original_ms, speed.model_ms]})
            status(f"{precision}, {k} blocks removed: {speed.text()} measured"
                   + (f" ({predicted:.3f}x predicted)" if predicted else ""))
        return known[k] / base

    goal = cfg.target_speedup * (1 + cfg.speedup_margin)
    if precision == "fp32":
        status(f"measuring the latency model on {cfg.backend}/{cfg.device}")
        first_guess = parameter_guess(run.model, n, cfg.target_speedup)
        info = run.runner.cached("latency_model", timing_inputs(cfg),
                                 lambda: _latency_model(run, n, first_guess, measure, pairs))
        fitted.append(LatencyModel.from_dict(info))
        try:
            first = min(max(fitted[0].blocks_for_speedup(cfg.target_speedup), 1), n - 1)
        except InvalidPlanError as exc:  # beyond the latency model's ceiling
            return {"k": None, "attempts": attempts, "why": str(exc)}
        for attempt in attempts:  # the latency model's own probe counts as the search's first measurement
            attempt["predicted"] = fitted[0].predict_speedup(attempt["blocks_removed"])
    else:
        first = parameter_guess(run.model, n, max(goal / base, 1.0 + 1e-6))
    reached = search_depth(first, measure, goal / base, n, cfg.max_probes, {k: v / base for k, v in known.items()})
    if reached is not None:
        return {"k": reached, "attempts": attempts, "why": None}
    best = max(attempts, key=lambda a: a["measured"])
    why = (f"the best measured at {precision} was {best['measured']:.3f}x with {best['blocks_removed']} blocks "
           "removed" + (f" ({fitted[0].explain()})" if fitted else ""))
    return {"k": None, "attempts": attempts, "why": why}


def _latency_model(run, n: int, k: int, measure, pairs: dict) -> dict:
    """Fixed and per-block cost on the target backend, from the full model and k blocks removed."""
    cfg = run.cfg
    measure(k)
    ra, rb = pairs[k]
    result = fit_latency_model(
        [(n, ra.prefill[0]["p50_ms"]), (n - k, rb.prefill[0]["p50_ms"])],
        [(n, ra.decode[0]["p50_ms"]), (n - k, rb.decode[0]["p50_ms"])],
        n, Workload(cfg.prefill_tokens, cfg.new_tokens, cfg.batch), cfg.backend, cfg.device,
        versions=ra.versions, settings=ra.settings)
    log.info("latency model: %s", result.explain())
    return result.to_dict()
