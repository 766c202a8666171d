"""The plan stage (K blocks, or the deepest plan within a perplexity budget) and the optional sweep."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from compressor.adapters import get_adapter
from compressor.errors import InvalidPlanError
from compressor.pipeline.calibrate import ProfileInputs, profile_inputs
from compressor.pipeline.data import perplexities
from compressor.pipeline.depth import DepthInputs, TimingInputs, depth_inputs, timing_inputs
from compressor.pipeline.measure import backend_for, bench_pair, workload_ms
from compressor.pipeline.runner import inputs_of
from compressor.util.progress import status

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PlanInputs:
    profile: ProfileInputs
    depth: DepthInputs | None            # None under a perplexity budget
    strategy: str
    max_ppl_increase: float | None
    search_windows: int
    eval: tuple[Path, ...]
    eval_max_tokens: int


@dataclass(frozen=True)
class SweepInputs:
    profile: ProfileInputs
    timing: TimingInputs
    strategy: str
    search_windows: int
    sweep: tuple[float, ...]
    eval: tuple[Path, ...]
    eval_max_tokens: int


def plan_inputs(cfg) -> PlanInputs:
    depth = depth_inputs(cfg) if cfg.target_speedup is not None else None
    return inputs_of(PlanInputs, cfg, profile=profile_inputs(cfg), depth=depth)


def plan_stage(run, data, k: int | None, profile):
    """The plan (work/plan.json, with its maps) and, under a budget, its perplexities; cached."""
    from compressor.surgery.plan import read_plan, write_plan

    def compute():
        plan, ppl = _choose_plan(run, data, k, profile)
        write_plan(plan, run.work / PLAN_FILE)
        return {"perplexity": ppl}

    result = run.runner.cached("plan", plan_inputs(run.cfg), compute, requires=(PLAN_FILE,))
    return read_plan(run.work / PLAN_FILE), result["perplexity"]


def _settings(cfg):
    from compressor.select import SelectSettings

    return SelectSettings(search_windows=cfg.search_windows or None)


def _choose_plan(run, data, k: int | None, profile):
    """The plan for K blocks; under a perplexity budget, the largest K within it.

    Under a budget one search serves every K (measured strategies search once, to the deepest
    level), and the maps are fitted only for the plans whose perplexity is looked at.
    """
    from compressor.select import plan_blocks

    cfg = run.cfg
    if k is not None:
        status(f"planning the removal of {k} blocks ({cfg.strategy})")
        found = plan_blocks(run.model, data.calibration, k, cfg.strategy, profile=profile, settings=_settings(cfg))
        return found[k], None
    return deepest_within_budget(run, data, profile)


def deepest_within_budget(run, data, profile):
    """(plan, perplexities) of the most blocks removed, up to half the depth, within the budget on every
    evaluation text: counts are tried from 1 up until one exceeds it."""
    from compressor.select import plan_blocks
    from compressor.surgery.plan import applied_copy

    cfg = run.cfg
    baseline = perplexities(run.model, data.evaluation)
    budget = {name: ppl * (1 + cfg.max_ppl_increase) for name, ppl in baseline.items()}
    n = get_adapter(run.model).num_blocks(run.model)
    deepest = max(1, n // 2)  # beyond half the depth no training-free plan keeps perplexity near the original
    found = plan_blocks(run.model, data.calibration, range(1, deepest + 1), cfg.strategy, profile=profile,
                        settings=_settings(cfg))
    best, best_ppl = None, None
    for count in range(1, deepest + 1):
        plan = found[count]
        candidate = applied_copy(run.model, plan)  # measured only: shares the weights
        ppl = perplexities(candidate, data.evaluation)
        status(f"{count} blocks removed: perplexity " + ", ".join(f"{v:.2f} (budget {budget[name]:.2f})"
                                                               for name, v in ppl.items()))
        if any(ppl[name] > budget[name] for name in ppl):
            break
        best, best_ppl = plan, ppl
    if best is None:
        raise InvalidPlanError(
            f"removing even one block exceeds the perplexity budget of +{cfg.max_ppl_increase:.0%}: "
            "allow a larger increase")
    return best, best_ppl


def sweep_stage(run, data, profile) -> list[dict] | None:
    if not run.cfg.sweep:
        return None
    inputs = inputs_of(SweepInputs, run.cfg, profile=profile_inputs(run.cfg), timing=timing_inputs(run.cfg))
    return run.runner.cached("sweep", inputs, lambda: _sweep(run, data, profile))


def _sweep(run, data, profile) -> list[dict]:
    """Training-free points at several depths: plan (one search), perplexity, measured latency."""
    from compressor.select import plan_blocks
    from compressor.surgery.plan import applied_copy

    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    levels = sorted({min(n - 1, round(level * n)) for level in cfg.sweep})
    ks = [k for k in levels if k > 0]
    found = plan_blocks(run.model, data.calibration, ks, cfg.strategy, profile=profile,
                        settings=_settings(cfg)) if ks else {}
    original = backend_for(run, run.model, "probe-original")
    points = []
    for k in levels:
        status(f"sweep: {k} of {n} blocks removed")
        if k == 0:
            model, drop = run.model, []
        else:
            plan = found[k]
            model, drop = applied_copy(run.model, plan), plan.drop
        ra, rb = bench_pair(run, original, backend_for(run, model, "probe-original" if k == 0 else f"probe-sweep-{k}"))
        points.append({"blocks_removed": k, "fraction": k / n, "drop": drop,
                       "latency_ms": workload_ms(rb), "original_latency_ms": workload_ms(ra),
                       "speedup": workload_ms(ra) / workload_ms(rb), "perplexity": perplexities(model, data.evaluation),
                       "healed": False})
    return points
