"""How many blocks to remove for the target speedup, *measured* on the target backend.

A first guess from parameter counts (the LM head does not shrink with depth) is measured first: a
copy with that many blocks removed, spread over the depth, exported and timed against the original
in alternation. That pair fits the latency model (fixed + per-block cost on this backend and device),
which refuses an unreachable target with its ceiling and makes the next guess; then
`latency_model.search_depth` corrects the guess from each probe's own measurement, both ways, within
`max_probes` probes (the first included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from compressor.adapters import get_adapter
from compressor.blocks import spread_blocks
from compressor.errors import InvalidPlanError
from compressor.evaluate import LatencyModel, Workload, fit_latency_model
from compressor.evaluate.latency_model import parameter_guess, search_depth
from compressor.pipeline.measure import backend_for, bench_pair, workload_ms
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


def timing_inputs(cfg) -> TimingInputs:
    return inputs_of(TimingInputs, cfg)


def depth_inputs(cfg) -> DepthInputs:
    return inputs_of(DepthInputs, cfg, timing=timing_inputs(cfg))


def blocks_for_target(run) -> tuple[int, list[dict]]:
    """The fewest blocks whose removal reaches the target (cached); returns (k, the probes measured)."""
    found = run.runner.cached("blocks", depth_inputs(run.cfg), lambda: _search(run))
    return found["k"], found["attempts"]


def _search(run) -> dict:
    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    original = backend_for(run, run.model, "probe-original")
    attempts: list[dict] = []
    pairs: dict[int, tuple] = {}
    fitted: list[LatencyModel] = []

    def measure(k: int) -> float:
        if k not in pairs:
            probe = backend_for(run, copy_without_blocks(run.model, spread_blocks(n, k)), f"probe-{k}")
            pairs[k] = bench_pair(run, original, probe)
        ra, rb = pairs[k]
        measured = workload_ms(ra) / workload_ms(rb)
        predicted = fitted[0].predict_speedup(k) if fitted else None
        attempts.append({"blocks_removed": k, "predicted": predicted, "measured": measured,
                         "latency_ms": [workload_ms(ra), workload_ms(rb)]})
        status(f"{k} blocks removed: {measured:.3f}x measured"
               + (f" ({predicted:.3f}x predicted)" if predicted else ""))
        return measured

    status(f"measuring the latency model on {cfg.backend}/{cfg.device}")
    first_guess = parameter_guess(run.model, n, cfg.target_speedup)
    info = run.runner.cached("latency_model", timing_inputs(cfg),
                             lambda: _latency_model(run, n, first_guess, measure, pairs))
    fitted.append(LatencyModel.from_dict(info))
    first = min(max(fitted[0].blocks_for_speedup(cfg.target_speedup), 1), n - 1)  # raises if out of reach
    for attempt in attempts:  # the latency model's own probe counts as the search's first measurement
        attempt["predicted"] = fitted[0].predict_speedup(attempt["blocks_removed"])
    known = {k: workload_ms(ra) / workload_ms(rb) for k, (ra, rb) in pairs.items()}
    reached = search_depth(first, measure, cfg.target_speedup * (1 + cfg.speedup_margin), n, cfg.max_probes, known)
    if reached is not None:
        return {"k": reached, "attempts": attempts}
    best = max(attempts, key=lambda a: a["measured"])
    raise InvalidPlanError(
        f"a {cfg.target_speedup:.2f}x speedup was not reached on {cfg.backend}/{cfg.device}: the best measured "
        f"was {best['measured']:.3f}x with {best['blocks_removed']} blocks removed ({fitted[0].explain()}); "
        "ask for less")


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
