"""The choice of precision and depth (a stage), the plan for that depth, and the optional sweep.

The training-free plans are searched once per set of depths and kept on the run, so the plan a
choice was estimated with is the plan that is applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from compressor.adapters import get_adapter
from compressor.pipeline.calibrate import ProfileInputs, profile_inputs
from compressor.pipeline.data import perplexities
from compressor.pipeline.depth import (
    TimingInputs,
    blocks_for_target,
    decided_speedup,
    depth_lines,
    timing_inputs,
)
from compressor.pipeline.measure import backend_for, measure_speedup
from compressor.pipeline.runner import inputs_of
from compressor.util.progress import status

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class ChoiceInputs:
    profile: ProfileInputs
    timing: TimingInputs
    precision: str
    format: str
    target_speedup: float | None
    max_ppl_increase: float | None
    max_probes: int
    speedup_margin: float
    strategy: str
    search_windows: int
    eval: tuple[Path, ...]
    eval_max_tokens: int


@dataclass(frozen=True)
class PlanInputs:
    profile: ProfileInputs
    blocks: int
    searched: tuple[int, ...]           # the depths searched together (a search may depend on them)
    strategy: str
    search_windows: int


@dataclass(frozen=True)
class SweepInputs:
    choice: ChoiceInputs
    sweep: tuple[float, ...]


def choice_inputs(cfg) -> ChoiceInputs:
    return inputs_of(ChoiceInputs, cfg, profile=profile_inputs(cfg), timing=timing_inputs(cfg))


def plan_inputs(cfg, choice: dict) -> PlanInputs:
    return inputs_of(PlanInputs, cfg, profile=profile_inputs(cfg), blocks=choice["blocks"],
                     searched=tuple(choice["searched"]))


def choice_stage(run, data, profile, points: list[dict]) -> dict:
    """The precision and blocks to remove (`precision.choose_for_target` or `choose_within_budget`), with
    every candidate and the training-free perplexity of each depth looked at (cached)."""
    from compressor.pipeline.precision import choose_for_target, choose_within_budget

    def compute():
        target = run.cfg.target_speedup is not None
        if target:  # the depth each precision needs (fp32's in full: the depth-only baseline)
            lines = depth_lines(run, points)
            fp32 = blocks_for_target(run, lines["fp32"])
            depth_ppl = TrainingFree(run, data, profile, [], lazy=True)

            def search(precision: str, at_most: int | None = None) -> dict:
                return fp32 if precision == "fp32" else blocks_for_target(run, lines[precision], at_most)

            choice = choose_for_target(run, points, depth_ppl, search)
            depth_only = _depth_only(fp32, depth_ppl, choice)
        else:
            # each depth searched as the curve reaches it (the greedy rounds resume), not all of them at once:
            # a budget that stops at 4 blocks of SmolLM2's 30 paid for 15 depths' spans and forms
            depth_ppl = TrainingFree(run, data, profile, [])
            choice = choose_within_budget(run, points, _budget_curve(run, data, points, depth_ppl))
            depth_only = next(c for c in choice["candidates"] if c["precision"] == "fp32")
        return {**choice, "depth_only": depth_only, "searched": list(depth_ppl.batches.get(choice["blocks"], ())),
                "depths_searched": depth_ppl.searched,
                "depth_perplexity": {str(k): v for k, v in depth_ppl.looked.items()}}

    return run.runner.cached("choice", choice_inputs(run.cfg), compute)


class TrainingFree:
    """k -> the training-free fp32 perplexity (per text) of the plan removing k blocks, each scored once.
    The plans for `ks` are searched together, and any other depth asked for later in a search of its own
    (`batches`: k -> the depths searched with it), which resumes the earlier searches' greedy rounds (the
    run's select memo, `plans_for`). `lazy`: a depth asked for is searched with one block past it
    (`beside`), whose score bounds every deeper plan from below (`precision.could_win`): one more round of
    the greedy search, where a deeper depth takes many, and nothing unless it is scored (`auto` searches a
    depth when its plan is first looked up)."""

    def __init__(self, run, data, profile, ks: list[int], lazy: bool = False):
        self.run, self.data, self.profile, self.lazy = run, data, profile, lazy
        self.batches: dict[int, tuple[int, ...]] = {k: tuple(sorted(ks)) for k in ks}
        self.looked: dict[int, dict] = {}

    @property
    def searched(self) -> list[int]:
        return sorted(self.batches)

    def beside(self, k: int) -> int | None:
        """The depth that bounds plans deeper than k from below when scored: k + 1, searched beside k (for k = 0,
        a precision alone: one block, the cheapest plan to search), or None."""
        return k + 1 if self.lazy and (k == 0 or k + 1 in self.batches) else None

    @property
    def scored(self) -> list[int]:
        return sorted(self.looked)

    def __call__(self, k: int) -> dict:
        if k not in self.looked:
            if k and k not in self.batches:
                n = get_adapter(self.run.model).num_blocks(self.run.model)
                beside = [k + 1] if self.lazy and k + 1 < n and k + 1 not in self.batches else []
                batch = tuple(sorted({k, *beside}))
                self.batches.update({j: batch for j in batch})
            model = training_free(self.run, self.data, self.profile, k, self.batches.get(k, ()))
            self.looked[k] = perplexities(model, self.data.evaluation)
        return self.looked[k]


def _depth_only(search: dict, depth_ppl: TrainingFree, choice: dict) -> dict:
    """The fp32 depth search as a baseline: its depth, measured speedup and training-free perplexity, or a
    lower bound on it (the deepest shallower depth scored: a deeper plan scores no better) where that puts
    it above the chosen estimate, or where its plan was never searched: a baseline is not worth a search
    (SmolLM2's demo went on from 7 blocks to 16, 9 more greedy rounds, for the 15 depth alone needed)."""
    from compressor.pipeline.precision import bound_at, first_value

    if search["k"] is None:
        return {"precision": "fp32", "blocks": None, "why": search["why"]}
    speed, spread = decided_speedup(search)
    out = {"precision": "fp32", "blocks": search["k"], "speedup": speed, "spread": spread}
    known = next((c for c in choice["candidates"] if (c["precision"], c["blocks"]) == ("fp32", search["k"])), None)
    if known is not None:
        return {**out, "estimate": known["estimate"], **({"at_least": known["at_least"]} if "at_least" in known else {})}
    bound = bound_at(search["k"], {n: 1.0 for n in choice["estimate"]}, depth_ppl)
    if bound is not None and (first_value(bound) > first_value(choice["estimate"])
                              or search["k"] not in depth_ppl.batches):
        return {**out, "estimate": {}, "at_least": bound}
    return {**out, "estimate": depth_ppl(search["k"])}


def _deepest(run) -> int:
    # beyond half the depth no training-free plan keeps perplexity near the original
    return max(1, get_adapter(run.model).num_blocks(run.model) // 2)


def _budget_curve(run, data, points: list[dict], depth_ppl) -> dict[int, dict]:
    """k -> training-free fp32 perplexity, from 0 up to the first depth beyond the budget at fp32."""
    from compressor.pipeline.precision import original_perplexity

    original = original_perplexity(points)
    budget = {name: ppl * (1 + run.cfg.max_ppl_increase) for name, ppl in original.items()}
    curve = {0: original}
    for k in range(1, _deepest(run) + 1):
        ppl = depth_ppl(k)
        status(f"{k} blocks removed: perplexity " + ", ".join(f"{v:.2f} (budget {budget[name]:.2f})"
                                                           for name, v in ppl.items()))
        if any(ppl[name] > budget[name] for name in ppl):
            break
        curve[k] = ppl
    return curve


def plans_for(run, data, profile, ks: tuple[int, ...]):
    """The plans for the depths `ks`, searched together once per run (kept on the run)."""
    from compressor.select import plan_blocks

    key = tuple(sorted(set(ks)))
    if key not in run.plans:
        run.plans[key] = plan_blocks(run.model, data.calibration, key, run.cfg.strategy, profile=profile,
                                     settings=select_settings(run), memo=run.plans.setdefault("select memo", {}))
    return run.plans[key]


def select_settings(run):
    """The plan search's settings for this run."""
    from compressor.select import SelectSettings

    return SelectSettings(search_windows=run.cfg.search_windows or None)


def plan_for(run, data, profile, k: int, searched: tuple[int, ...]):
    """The plan removing k blocks (an empty plan for 0); from compressor's plan cache where a run of the same
    model, calibration windows, strategy and search settings found it before (`cached_plan`)."""
    from compressor.surgery.plan import Plan

    if k == 0:
        n = get_adapter(run.model).num_blocks(run.model)
        return Plan(run.cfg.strategy, n, [], provenance={"note": "no block removed: the precision alone meets the "
                                                                 "target"})
    searched = searched or (k,)
    return cached_plan(run, data, k, searched, lambda: plans_for(run, data, profile, searched)[k])


def cached_plan(run, data, k: int, searched: tuple[int, ...], search):
    """`search()`'s plan for k blocks, kept in compressor's cache (`plans/`) as the profile is: a later run of
    the same model content, calibration windows, strategy, search settings and depths searched together
    (and the same compressor and PyTorch) reads it instead of searching again. A run without `out` neither
    reads nor writes it."""
    from compressor.pipeline.timings import cache_entry, versions
    from compressor.surgery.plan import read_plan, write_plan
    from compressor.util.fingerprint import windows_fingerprint
    from compressor.util.io import atomic_dir

    if not run.runner.persistent:
        return search()
    key = {"model": run.content_id(), "windows": windows_fingerprint(data.calibration), "strategy": run.cfg.strategy,
           "settings": asdict(select_settings(run)),
           "searched": sorted(searched), "k": k, "versions": versions()}
    entry = cache_entry(run, "plans", hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24])
    if entry is None:
        return search()
    if str(entry) in run.plans:  # this run's own, searched or read already
        return run.plans[str(entry)]
    if (entry / PLAN_FILE).is_file():
        status(f"using the cached plan for {k} blocks ({entry})")
        plan = read_plan(entry / PLAN_FILE)
        plan.provenance["cached"] = str(entry)
    else:
        plan = search()
        try:
            with atomic_dir(entry, overwrite=True) as tmp:
                write_plan(plan, tmp / PLAN_FILE)
        except OSError as exc:  # a cache that cannot be written is not worth failing the run for
            log.warning("could not cache the plan in %s: %s", entry, exc)
    run.plans[str(entry)] = plan
    return plan


def training_free(run, data, profile, k: int, searched: tuple[int, ...]):
    """The model as the plan for k blocks leaves it, without healing (shares the original's weights)."""
    from compressor.surgery.plan import applied_copy

    if k == 0:
        return run.model
    return applied_copy(run.model, plan_for(run, data, profile, k, searched))


def plan_stage(run, data, choice: dict, profile):
    """The plan for the chosen depth (work/plan.json, with its maps; cached)."""
    from compressor.surgery.plan import read_plan, write_plan

    def compute():
        write_plan(plan_for(run, data, profile, choice["blocks"], tuple(choice["searched"])), run.work / PLAN_FILE)
        return {}

    run.runner.cached("plan", plan_inputs(run.cfg, choice), compute, requires=(PLAN_FILE,))
    return read_plan(run.work / PLAN_FILE)


def sweep_stage(run, data, profile, points: list[dict]) -> list[dict] | None:
    if not run.cfg.sweep:
        return None
    inputs = inputs_of(SweepInputs, run.cfg, choice=choice_inputs(run.cfg))
    return run.runner.cached("sweep", inputs, lambda: _sweep(run, data, profile, points))


def _sweep(run, data, profile, points: list[dict]) -> list[dict]:
    """Training-free points at several depths on top of every candidate precision: plan (one search),
    perplexity (through the runtime for a quantized export), latency measured against the original.
    Each a report.SweepPoint's fields (a quantize-only point carries more: "one_left", under a target)."""
    from dataclasses import fields

    from compressor.report import SweepPoint

    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    levels = sorted({min(n - 1, round(level * n)) for level in cfg.sweep})
    ks = tuple(k for k in levels if k > 0)
    original = backend_for(run, run.model, "probe-original")
    out = []
    for point in points:
        p = point["precision"]
        for k in levels:
            if k == 0 and point["latency_ms"] is not None:  # the quantize-only point, as measured
                out.append({**{f.name: point[f.name] for f in fields(SweepPoint) if f.name in point},
                            "fraction": 0.0, "drop": [], "healed": False})
                continue
            status(f"sweep: {p}, {k} of {n} blocks removed")
            plan = plan_for(run, data, profile, k, ks)
            model = training_free(run, data, profile, k, ks)
            name = "probe-original" if k == 0 else f"probe-sweep-{k}" if p == "fp32" else f"probe-sweep-{p}-{k}"
            probe = backend_for(run, model, name, p, quant=None)  # quantized as it would be delivered
            speed, _ = measure_speedup(run, original, probe)
            ppl = perplexities(model if p == "fp32" else probe, data.evaluation)  # a quantized one through the runtime
            probe.close()
            out.append({"precision": p, "blocks_removed": k, "fraction": k / n, "drop": plan.drop,
                        "latency_ms": speed.model_ms, "original_latency_ms": speed.original_ms,
                        "speedup": speed.value, "spread": speed.spread, "rounds": speed.rounds,
                        "perplexity": ppl, "healed": False})
    return out
