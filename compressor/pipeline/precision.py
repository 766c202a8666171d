"""Precision x depth: which precision, and how many blocks removed on top of it, the run delivers.

1. Quantize only: every precision the backend and device run (`precisions_for`) is exported from the
   unpruned model, timed against the original fp32 model (all of them in one alternation) and scored for
   perplexity on the evaluation texts through the runtime itself. No training, so this is cheap.
2. For each precision no other one dominates (faster beyond their measured spreads *and* no worse),
   the fewest blocks removed on top of it for the target (`depth.blocks_for_target`: a line per
   precision through its unpruned point and a copy with one block left names the first probe, the
   line through every probe decides), fastest precision first, a slower one held to the depths at
   which it could still win (`could_win`); or under a perplexity budget the most blocks that keep it
   within the budget.
3. Target: the combination that reaches it with the lowest perplexity; budget: the fastest
   combination within it. A combination's perplexity is the training-free perplexity of its plan at
   fp32 times its precision's measured quantization ratio (exact when no block is removed), so no
   block is removed that the target does not need. For SmolLM2 plans of 2-6 blocks it came within 0.8% of
   the deployed int4 export on average; scoring with fake-quantized weights was 17% off
   (bench/quantized_scoring.py).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InvalidPlanError
from compressor.pipeline.data import perplexities
from compressor.pipeline.depth import (
    TimingInputs,
    decided_speedup,
    one_left,
    one_left_copies,
    probe_name,
    time_depth,
    timing_inputs,
)
from compressor.pipeline.measure import Speedup, backend_for, measure_together
from compressor.pipeline.runner import inputs_of
from compressor.pipeline.timings import cached_timing
from compressor.util.progress import status

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "int4")


def precisions_for(backend: str, device: str, format: str = "none") -> tuple[str, ...]:
    """The precisions `compress model` can time (and deliver in `format`) on this backend and device.

    torch times the PyTorch model itself (fp32); ONNX Runtime on a CPU runs fp32 and weight-only int8
    and int4 (its CPU kernels upcast fp16, which is slower than fp32); on CUDA fp16 too; TensorRT
    builds fp32 and fp16 engines, and int8 with NVIDIA ModelOpt installed.
    """
    if backend == "torch":
        return ("fp32",)
    tensorrt = backend == "tensorrt" or format == "tensorrt"
    if tensorrt:
        return ("fp32", "fp16") + (("int8",) if importlib.util.find_spec("modelopt") is not None else ())
    if str(device).startswith("cuda"):
        return ("fp32", "fp16", "int8", "int4")
    return ("fp32", "int8", "int4")


def precision_problem(precision: str, backend: str, device: str, format: str) -> str | None:
    """Why a pinned `precision` cannot run on this backend, device and format (None: it can)."""
    if precision == "auto":
        return None
    runs = precisions_for(backend, device, format)
    if precision in runs:
        return None
    if precision == "int4" and "tensorrt" in (backend, format):
        return ("--precision int4 cannot be built by TensorRT (its engines cannot hold int4 weight-only "
                f"MatMulNBits): use --backend onnxruntime --format onnx, or one of {', '.join(runs)}")
    where = f"{backend}/{device}" + (f" with --format {format}" if format not in ("none", "onnx") else "")
    return f"--precision {precision} does not run on {where}: choose auto or one of {', '.join(runs)}"


def candidates(cfg) -> tuple[str, ...]:
    """The precisions the run may deliver: every one the backend runs, or the one pinned."""
    return precisions_for(cfg.backend, cfg.device, cfg.format) if cfg.precision == "auto" else (cfg.precision,)


@dataclass(frozen=True)
class PrecisionInputs:
    timing: TimingInputs
    format: str
    data: Path | None
    field: str
    eval: tuple[Path, ...]
    eval_max_tokens: int
    lines: bool                     # a target: the copies with one block left are timed with the points


def precision_stage(run, data) -> list[dict]:
    """The quantize-only point of every precision the backend runs, pinned or not: the report's baselines
    (cached): {precision, blocks_removed: 0, speedup, spread, rounds, latency_ms, original_latency_ms,
    perplexity: {text: value}}, and under a target "one_left": the speedup of a copy with one block left at
    that precision (`depth.depth_lines`), timed in the same alternation."""
    return run.runner.cached("precisions", precision_inputs(run.cfg), lambda: _quantize_only(run, data))


def precision_inputs(cfg) -> PrecisionInputs:
    return inputs_of(PrecisionInputs, cfg, timing=timing_inputs(cfg), lines=cfg.target_speedup is not None)


def _quantize_only(run, data) -> list[dict]:
    cfg = run.cfg
    original_ppl = perplexities(run.model, data.evaluation)
    original = backend_for(run, run.model, "probe-original")
    quantized = [p for p in precisions_for(cfg.backend, cfg.device, cfg.format) if p != "fp32"]
    probes = {}
    for precision in quantized:
        status(f"quantize only: {precision}")
        probes[precision] = backend_for(run, run.model, probe_name(precision, 0), precision, quant=None)  # as delivered
    # every precision in one alternation, and under a target the copies with one block left at each (the
    # second point of its depth line): the host's drift between minutes hits them alike
    lines = cfg.target_speedup is not None

    def measure() -> dict:  # the copies are exported only when the timing cache lacks the group
        group = {**probes, **(one_left_copies(run, ["fp32", *quantized]) if lines else {})}
        return {p: s.to_dict() for p, s in measure_together(run, original, group, cfg.target_speedup).items()}

    what = {"what": "quantize-only", "precisions": quantized, "one_left": lines, "quant": "delivered",
            "data": cfg.data}
    speeds = cached_timing(run, what, cfg.target_speedup, measure) if probes or lines else {}
    points = [{"precision": "fp32", "blocks_removed": 0, "speedup": 1.0, "spread": 0.0, "rounds": [1.0],
               "latency_ms": None, "original_latency_ms": None, "perplexity": original_ppl}]
    for precision, probe in probes.items():
        speed = Speedup(**speeds[precision])
        ppl = perplexities(probe, data.evaluation)  # through the runtime
        probe.close()
        status(f"{precision} alone: {speed.text()}, perplexity "
               + ", ".join(f"{v:.3f} ({v / original_ppl[n] - 1:+.1%})" for n, v in ppl.items()))
        points.append({"precision": precision, "blocks_removed": 0, "speedup": speed.value, "spread": speed.spread,
                       "rounds": speed.rounds, "latency_ms": speed.model_ms, "original_latency_ms": speed.original_ms,
                       "perplexity": ppl})
    for point in points:
        if one_left(point["precision"]) in speeds:
            point["one_left"] = speeds[one_left(point["precision"])]["value"]
    for point in points:  # the original's latency, from the measurements that timed it
        if point["precision"] == "fp32":
            times = [p["original_latency_ms"] for p in points if p["original_latency_ms"]]
            point["latency_ms"] = point["original_latency_ms"] = sorted(times)[len(times) // 2] if times else None
    return points


def first_value(ppl: dict) -> float:
    return next(iter(ppl.values()))


def undominated(points: list[dict]) -> list[dict]:
    """The points no other point beats on speed and perplexity (the first text) both, by perplexity. A point
    beats another only where it is faster beyond their measured spreads: two speedups within the noise of
    each other (SmolLM2 once measured int4 alone at 1.433x +-0.051 and int8 at 1.451x +-0.048, where int4
    was the faster in every other run) leave both in the running, for their depth searches to settle."""
    def beats(a, b):
        noise = max(a.get("spread") or 0.0, b.get("spread") or 0.0)
        return (a["speedup"] >= b["speedup"] * (1 + noise) and first_value(a["perplexity"]) <= first_value(b["perplexity"])
                and (a["speedup"], first_value(a["perplexity"])) != (b["speedup"], first_value(b["perplexity"])))

    kept = [p for p in points if not any(beats(q, p) for q in points)]
    return sorted(kept, key=lambda p: first_value(p["perplexity"]))


def ratio(point: dict, original_ppl: dict) -> dict[str, float]:
    """The precision's perplexity over the original's, per text."""
    return {name: point["perplexity"][name] / original_ppl[name] for name in original_ppl}


def allowed(run, points: list[dict]) -> list[dict]:
    """The quantize-only points of the precisions the run may deliver."""
    return [p for p in points if p["precision"] in candidates(run.cfg)]


def original_perplexity(points: list[dict]) -> dict:
    return next(p for p in points if p["precision"] == "fp32")["perplexity"]


def choose_for_target(run, points: list[dict], depth_ppl, search) -> dict:
    """{"precision", "blocks", "speedup", "spread", "estimate", "candidates", "tried"}: the combination that
    reaches the target with the lowest estimated perplexity, among the precisions the run may deliver.
    `depth_ppl(k)` is the training-free fp32 perplexity (per text) of the plan removing k blocks; `search(
    precision, at_most)` finds the blocks on top of a precision (`depth.blocks_for_target`'s result), or,
    given `at_most`, whether that many reach the target at all (k None when they do not).

    A precision alone that meets the target leaves only the precisions of lower perplexity to try. Those are
    tried fastest first (they need the fewest blocks), each estimated at once, so that a slower one is held
    to the depths at which it could still win: a deeper plan scores no better than a shallower one, so once
    some depth d at its perplexity ratio scores above the best estimate, it wins only with fewer than d blocks
    removed, and one probe at d - 1 settles whether that many reach the target (`could_win`)."""
    cfg = run.cfg
    goal = cfg.target_speedup * (1 + cfg.speedup_margin)
    original_ppl = original_perplexity(points)
    pool = undominated(allowed(run, points))
    found, tried = [], []
    alone = next((point for point in pool if point["speedup"] >= goal), None)
    if alone is not None:
        found.append({"precision": alone["precision"], "blocks": 0, "speedup": alone["speedup"],
                      "spread": alone["spread"], "estimate": alone["perplexity"]})
        tried.append({"precision": alone["precision"], "blocks": 0, "reached": True, "why": None})
        pool = pool[:pool.index(alone)]  # the later ones have a higher perplexity already, before any block goes
    for point in sorted(pool, key=lambda point: -point["speedup"]):
        p, r = point["precision"], ratio(point, original_ppl)
        at_most = could_win(r, found, depth_ppl, original_ppl)
        if at_most is not None and at_most < 1:
            tried.append({"precision": p, "blocks": None, "reached": False, "why": None, "attempts": [],
                          "beaten": "its perplexity ratio alone puts it above the best estimate"})
            continue
        depth = search(p, at_most)
        tried.append({"precision": p, "blocks": depth["k"], "reached": depth["k"] is not None, "why": depth["why"],
                      "attempts": depth["attempts"], **({"beaten": depth["beaten"]} if depth.get("beaten") else {})})
        if depth["k"] is None:
            continue
        speed, spread = decided_speedup(depth)
        found.append(estimated({"precision": p, "blocks": depth["k"], "speedup": speed, "spread": spread}, r,
                               found, depth_ppl))
    if not found:
        best = _best_measured(allowed(run, points), tried)
        raise InvalidPlanError(
            f"a {cfg.target_speedup:.2f}x speedup was not reached on {cfg.backend}/{cfg.device} by any precision "
            f"and depth: the best measured was {best}; " + "; ".join(t["why"] for t in tried if t["why"])
            + "; ask for less")
    chosen = min((c for c in found if c["estimate"]), key=lambda c: (first_value(c["estimate"]), c["blocks"]))
    return {**chosen, "candidates": found, "tried": tried}


def _best(found: list[dict]) -> dict | None:
    scored = [c for c in found if c["estimate"]]
    return min(scored, key=lambda c: first_value(c["estimate"])) if scored else None


def could_win(r: dict, found: list[dict], depth_ppl, original_ppl: dict) -> int | None:
    """The most blocks with which a precision of perplexity ratio `r` could still beat the best candidate
    found: d - 1 for the shallowest depth d scored so far (the original counts as depth 0) whose perplexity
    times `r` is above the best estimate; None where nothing bounds it. The depth searched beside the best
    candidate's (`depth_ppl.beside`: one block past it, with a lazy TrainingFree) is scored for this."""
    best = _best(found)
    if best is None:
        return None
    extra = getattr(depth_ppl, "beside", lambda k: None)(best["blocks"])
    if extra is not None:
        depth_ppl(extra)
    scored = {0: original_ppl, **{d: depth_ppl(d) for d in getattr(depth_ppl, "scored", [])}}
    above = [d for d, ppl in scored.items() if first_value(ppl) * first_value(r) > first_value(best["estimate"])]
    return min(above) - 1 if above else None


def estimated(c: dict, r: dict, found: list[dict], depth_ppl) -> dict:
    """Candidate `c` with its estimated perplexity ("estimate", per text): the training-free perplexity of its
    depth times its precision's ratio `r`; or, where a shallower depth bounds it above the best estimate so
    far, "at_least" and an empty estimate (its plan is then never searched nor scored). The shallower depths
    are scored one block deeper at a time (`walk_bound`) before a deep depth is searched outright."""
    best = _best(found)
    bound = walk_bound(c["blocks"], r, best, depth_ppl) if best is not None else None
    if bound is not None:
        return {**c, "estimate": {}, "at_least": bound}
    return {**c, "estimate": {n: v * r[n] for n, v in depth_ppl(c["blocks"]).items()}}


def walk_bound(k: int, r: dict, best: dict, depth_ppl) -> dict | None:
    """A lower bound on the estimate of k blocks removed that lies above `best`'s estimate, or None: the deepest
    shallower depth scored, and while it is not above, the next depth scored, up to k - 1. Each step is one more
    greedy round of the run's search where k would take all of them: SmolLM2's demo at 1.8x once searched 17
    blocks for fp32 (13 more rounds and their fits, over 5 minutes) because the depths scored, 3 and 4, did not
    bound it; in the next run, one block deeper than the depths scored did (3, against int4 with 1 block)."""
    while True:
        bound = bound_at(k, r, depth_ppl)
        if _above(bound, best):
            return bound
        scored = [j for j in getattr(depth_ppl, "scored", None) or [] if j < k]
        if not scored or max(scored) + 1 >= k:
            return None
        depth_ppl(max(scored) + 1)


def _above(bound: dict | None, best: dict) -> bool:
    return bound is not None and first_value(bound) > first_value(best["estimate"])


def bound_at(k: int, r: dict, depth_ppl) -> dict | None:
    """A lower bound on the estimate of k blocks removed: the deepest shallower depth already scored."""
    shallower = [j for j in getattr(depth_ppl, "scored", []) if j < k]
    return {n: v * r[n] for n, v in depth_ppl(max(shallower)).items()} if shallower else None


def _best_measured(points: list[dict], tried: list[dict]) -> str:
    measured = [(p["speedup"], p["precision"], 0) for p in points]
    for t in tried:
        measured += [(a["measured"], t["precision"], a["blocks_removed"]) for a in t.get("attempts") or []]
    speed, precision, k = max(measured)
    return f"{speed:.3f}x at {precision} with {k} blocks removed"


def choose_within_budget(run, points: list[dict], curve: dict[int, dict], timed=None) -> dict:
    """The fastest combination within the perplexity budget: for each precision within it alone, the most
    blocks whose estimated perplexity stays within it (`curve`: k -> training-free fp32 perplexity per
    text, for the depths that were within the budget at fp32), timed by `timed(precision, k)` -> Speedup
    when blocks are removed."""
    cfg = run.cfg
    original_ppl = curve[0]
    budget = {name: v * (1 + cfg.max_ppl_increase) for name, v in original_ppl.items()}
    may = candidates(cfg)
    alone = {p["precision"]: p for p in points}
    timed = timed or (lambda p, k: time_depth(run, p, k, alone[p]["speedup"], alone[p]["spread"] or 0.0))
    found = []
    for point in points:
        p = point["precision"]
        r = ratio(point, original_ppl)
        within = [k for k, ppl in curve.items() if all(ppl[t] * r[t] <= budget[t] for t in ppl)]
        if not within:
            continue
        k = max(within)
        speed, spread = point["speedup"], point["spread"]
        if k > 0:
            measured = timed(p, k)
            speed, spread = measured.value, measured.spread
        status(f"{p} with {k} blocks removed: {speed:.3f}x within the budget")
        found.append({"precision": p, "blocks": k, "speedup": speed, "spread": spread,
                      "estimate": {t: v * r[t] for t, v in curve[k].items()}})
    useful = [c for c in found if (c["precision"], c["blocks"]) != ("fp32", 0) and c["precision"] in may]
    if not useful:
        raise InvalidPlanError(
            f"neither quantizing ({', '.join(may)}) nor removing even one block stays within the perplexity "
            f"budget of +{cfg.max_ppl_increase:.0%}: allow a larger increase")
    # the fastest; among those within its measured spread of it, the lowest perplexity
    fastest = max(c["speedup"] for c in useful)
    close = [c for c in useful if c["speedup"] * (1 + c["spread"]) >= fastest]
    chosen = min(close, key=lambda c: (first_value(c["estimate"]), -c["speedup"]))
    return {**chosen, "candidates": found, "tried": []}
