"""How many blocks to remove for the target speedup, on top of a precision, *measured* on the target backend.

Latency falls along a straight line in the blocks kept (`evaluate.latency_model`). At each precision
that line runs through two measurements, both against the original fp32 model in alternation: the
unpruned model at that precision (its quantize-only point) and a copy with one block left, exported
at the precision and timed in the same alternation as the quantize-only points (`one_left_copies`; the
copies are small, so this costs far less than a probe). The line names the first probe: a copy with
that many blocks removed, spread over the depth, exported at the precision and timed against the
unpruned model at the same precision, its speedup that ratio times the precision's own (`time_depth`:
the drift between two precisions' kernels cancels). `latency_model.search_depth` corrects the guess
from each probe's own measurement, both ways, within `max_probes` probes, and skips the depth just
below one that reached the target when the line, scaled to agree with the nearest measured depth, puts
it clearly short. A target beyond the line's reach (even one block left falls short) is out of reach
without a probe. On top of a quantized precision the search runs on speedups relative to that
precision's unpruned model.

Each probe is timed once; the depth is then decided on every measurement of the precision together
(`pooled`: a least-squares line in the blocks removed through its unpruned point and every probe), the
fewest probed blocks whose pooled speedup reaches the target. One round of a pair varies by several
percent, more than a block is worth: deciding on single probes, re-measured near the target, took
three rounds a probe and still let one stray round (SmolLM2 at int4: 2 blocks 1.652x, between 1 block
at 1.495x and 3 blocks at 1.596x) decide.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from compressor.adapters import get_adapter
from compressor.blocks import spread_blocks
from compressor.evaluate.latency_model import LinearCost, fit_line, search_depth
from compressor.pipeline.config import EXPORT_FOR_BACKEND
from compressor.pipeline.measure import (
    Speedup,
    backend_for,
    measure_speedup,
    open_backend,
    probe_holding,
    probe_key,
)
from compressor.pipeline.runner import inputs_of
from compressor.pipeline.timings import cached_timing
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


def time_depth(run, precision: str, k: int, base: float, base_spread: float = 0.0) -> Speedup:
    """The Speedup, against the original fp32 model, of k blocks removed (spread over the depth) at
    `precision`, whose unpruned model measured `base` (+-`base_spread`, relative) against it: the copy is
    timed against that unpruned model at the same precision (`reference`), and the ratio scaled by `base`.
    Two graphs of one precision run the same kernels, so drift between precisions cancels: SmolLM2 at int4
    timed against fp32 measured 1.691x unpruned and 1.516x with one block removed in one run. The ratio
    comes from the timing cache when this host measured it before (then nothing is exported)."""
    def measure() -> dict:
        n = get_adapter(run.model).num_blocks(run.model)
        model = copy_without_blocks(run.model, spread_blocks(n, k))
        probe = backend_for(run, model, probe_name(precision, k), precision)
        return measure_speedup(run, reference(run, precision), probe)[0].to_dict()

    what = {"what": "depth", "precision": precision, "blocks": k, "quant": "probe", "against": "unpruned"}
    ratio = Speedup(**cached_timing(run, what, None, measure))
    return Speedup(ratio.value * base, math.hypot(ratio.spread, base_spread), [r * base for r in ratio.rounds],
                   ratio.original_ms * base, ratio.model_ms)


def reference(run, precision: str):
    """What a depth probe at `precision` is timed against: the unpruned model at that precision (the original
    itself at fp32; the quantize-only point's export where this run made it, else one rounded to nearest,
    which runs the same kernels)."""
    if precision == "fp32":
        return backend_for(run, run.model, "probe-original")
    delivered = probe_holding(run, probe_key("original", EXPORT_FOR_BACKEND[run.cfg.backend], precision, None))
    if delivered is not None:
        return open_backend(run, delivered, precision)
    return backend_for(run, run.model, probe_name(precision, 0) + "-rtn", precision)


@dataclass
class DepthLine:
    """Workload time at `precision` as a fraction of the original fp32 model's, a line in the blocks kept
    (fixed + per_block x kept) through the unpruned model and the copy with one block left."""

    precision: str
    blocks: int                     # depth of the full model
    fixed: float
    per_block: float
    unpruned: float                 # the two measured speedups the line runs through
    one_left: float
    unpruned_spread: float = 0.0    # the unpruned speedup's measured spread (relative)

    @classmethod
    def through(cls, precision: str, n: int, unpruned: float, one_left: float, spread: float = 0.0) -> DepthLine:
        per_block = (1 / unpruned - 1 / one_left) / max(n - 1, 1)
        return cls(precision, n, 1 / one_left - per_block, per_block, unpruned, one_left, spread)

    def speedup(self, k: int) -> float:
        """Predicted speedup (against the original fp32 model) with k blocks removed at this precision."""
        t = self.fixed + self.per_block * (self.blocks - k)
        return 1 / t if t > 0 else float("inf")

    def anchored(self, k: int, measured: dict[int, float]) -> float:
        """The predicted speedup of k blocks removed, scaled to agree with the nearest depth `measured`."""
        j = min(measured, key=lambda m: (abs(m - k), m))
        return self.speedup(k) * measured[j] / self.speedup(j)

    def fewest(self, goal: float) -> int | None:
        """The fewest blocks whose predicted speedup reaches `goal`; None if even one block left falls short."""
        return next((k for k in range(self.blocks) if self.speedup(k) >= goal), None)

    def explain(self) -> str:
        if self.per_block <= 0 or self.fixed <= 0:
            return (f"at {self.precision} the copy with one block left measured {self.one_left:.2f}x against "
                    f"{self.unpruned:.2f}x unpruned: the timings are too noisy to fit a line; measure with more "
                    "--timing-seconds on a quiet machine")
        share = self.fixed / (self.fixed + self.per_block * self.blocks)
        return (f"at {self.precision} the fixed cost (embeddings, head and overhead, which do not shrink with "
                f"depth) is {share:.0%} of the unpruned time, so even one block left gives {self.one_left:.2f}x")


def one_left(precision: str) -> str:
    """The name of the copy with one block left at `precision` among the precision points' timings."""
    return f"{precision}, one block left"


def one_left_copies(run, precisions: list[str]) -> dict:
    """one_left(precision) -> a backend on a copy of the model with one block left, exported at each precision:
    the second point of each depth line, timed beside the precision points (`precision.precision_stage`)."""
    n = get_adapter(run.model).num_blocks(run.model)
    status(f"exporting a copy with one block left at {', '.join(precisions)}")
    one = copy_without_blocks(run.model, spread_blocks(n, n - 1))
    return {one_left(p): backend_for(run, one, probe_name(p, n - 1), p) for p in precisions}


def depth_lines(run, points: list[dict]) -> dict[str, DepthLine]:
    """Each point's precision -> its DepthLine, through the point (the unpruned model at that precision) and
    its copy with one block left ("one_left"), timed against the original in one alternation."""
    n = get_adapter(run.model).num_blocks(run.model)
    lines = {}
    for point in points:
        line = DepthLine.through(point["precision"], n, point["speedup"], point["one_left"], point.get("spread") or 0.0)
        log.info("%s: %s; %d blocks removed would give %.3fx", point["precision"], line.explain(), n // 4,
                 line.speedup(n // 4))
        lines[point["precision"]] = line
    return lines


def blocks_for_target(run, line: DepthLine, at_most: int | None = None) -> dict:
    """The fewest blocks whose removal, on top of `line.precision`, reaches the target (cached): {"k": blocks
    or None when out of reach, "attempts": the probes measured, "why": why it is out of reach}. `at_most`:
    only that many blocks or fewer are of use (more cost more perplexity than a better combination): they
    are probed first, and where they fall short the search ends there, "beaten" saying so."""
    precision = line.precision
    name = ("blocks" if precision == "fp32" else f"blocks-{precision}") + (f"-at-most-{at_most}" if at_most else "")
    return run.runner.cached(name, depth_inputs(run.cfg, precision), lambda: _search(run, line, at_most))


def _search(run, line: DepthLine, at_most: int | None = None) -> dict:
    cfg = run.cfg
    precision, n, base = line.precision, line.blocks, line.unpruned
    attempts: list[dict] = []
    known: dict[int, float] = {}

    def measure(k: int) -> float:  # the speedup of k blocks removed, relative to the unpruned model at `precision`
        if k not in known:
            speed = time_depth(run, precision, k, base, line.unpruned_spread)  # one round: the decision pools them
            known[k] = speed.value
            attempts.append({"blocks_removed": k, "precision": precision, "predicted": line.speedup(k),
                             "measured": speed.value, "spread": speed.spread, "rounds": speed.rounds,
                             "latency_ms": [speed.original_ms, speed.model_ms]})
            status(f"{precision}, {k} blocks removed: {speed.text()} measured ({line.speedup(k):.3f}x predicted)")
        return known[k] / base

    goal = cfg.target_speedup * (1 + cfg.speedup_margin)
    first = line.fewest(goal)
    if first is None:  # beyond the line's reach: the copy with one block left is the best there is
        attempts.append({"blocks_removed": n - 1, "precision": precision, "predicted": line.one_left,
                         "measured": line.one_left, "spread": 0.0, "rounds": [line.one_left], "latency_ms": []})
        return {"k": None, "attempts": attempts,
                "why": f"{cfg.target_speedup:.2f}x is out of reach by removing blocks at {precision}: {line.explain()}"}
    if at_most is not None and first > at_most:  # the line says more are needed: one probe to be sure
        measure(at_most)
        if decide(line, attempts, goal) is None:
            return {"k": None, "attempts": attempts, "why": None,
                    "beaten": (f"{at_most} blocks removed measured {known[at_most]:.3f}x, short of the {goal:.3f}x "
                               "the target asks; more would score above a better combination")}
        first = at_most  # they do: the search goes on from there, toward fewer
    search_depth(max(first, 1), measure, goal / base, n, cfg.max_probes,
                 predict=lambda k: line.anchored(k, known) / base, scale=base)
    decided = decide(line, attempts, goal)
    while decided is None and len(known) < cfg.max_probes:  # the line puts every probe short: one deeper
        k = next_probe(line, attempts, goal)
        if k is None:
            break
        measure(k)
        decided = decide(line, attempts, goal)
    if decided is not None:
        status(f"{precision}: {decided['k']} blocks removed, {decided['speedup']:.3f}x on the line through "
               f"every measurement at {precision}")
        return {**decided, "attempts": attempts, "why": None}
    best = max(attempts, key=lambda a: a["measured"])
    why = (f"the best measured at {precision} was {best['measured']:.3f}x with {best['blocks_removed']} blocks "
           f"removed ({line.explain()})")
    return {"k": None, "attempts": attempts, "why": why}


def pooled(line: DepthLine, attempts: list[dict]) -> LinearCost | None:
    """Time as a fraction of the original fp32 model's, a least-squares line in the blocks *removed*, through
    the precision's unpruned point and every round of every probe; None where time does not fall with depth
    (the timings are too noisy to fit)."""
    points = [(0, 1 / line.unpruned)] + [(a["blocks_removed"], 1 / r) for a in attempts for r in a["rounds"] if r > 0]
    if len({k for k, _ in points}) < 2:
        return None
    fit = fit_line(points)
    return fit if fit.per_block_ms < 0 else None


def decide(line: DepthLine, attempts: list[dict], goal: float) -> dict | None:
    """{"k", "speedup", "spread", "pooled"}: the fewest probed blocks whose speedup on the `pooled` line reaches
    `goal` (its spread: two standard errors of the line there); without a line, the fewest whose own
    measurement reached it; None where neither does."""
    fit = pooled(line, attempts)
    probed = sorted({a["blocks_removed"] for a in attempts})
    if fit is None:
        reached = [a for a in attempts if a["measured"] >= goal]
        if not reached:
            return None
        a = min(reached, key=lambda a: a["blocks_removed"])
        return {"k": a["blocks_removed"], "speedup": a["measured"], "spread": a["spread"], "pooled": None}
    k = next((k for k in probed if 1 / fit.at(k) >= goal), None)
    if k is None:
        return None
    own = next(a["spread"] for a in attempts if a["blocks_removed"] == k)
    spread = 2 * _standard_error(fit, k) / fit.at(k) if len(fit.points) > 2 else own  # two points: no residual
    return {"k": k, "speedup": 1 / fit.at(k), "spread": spread,
            "pooled": {"unpruned": 1 / fit.at(0), "per_block": -fit.per_block_ms, "points": fit.points}}


def next_probe(line: DepthLine, attempts: list[dict], goal: float) -> int | None:
    """The depth to probe when the pooled line puts every probed depth short of `goal`: the fewest blocks,
    deeper than every probe, that the line puts at the goal (without a line, one block deeper); None
    where no depth short of one block left would reach it."""
    deepest = max(a["blocks_removed"] for a in attempts)
    fit = pooled(line, attempts)
    if fit is None:
        return deepest + 1 if deepest + 1 < line.blocks else None
    return next((k for k in range(deepest + 1, line.blocks) if 1 / fit.at(k) >= goal), None)


def _standard_error(fit: LinearCost, k: float) -> float:
    """The standard error of the fitted line at k (three points or more)."""
    m = len(fit.points)
    residual = sum((t - fit.at(b)) ** 2 for b, t in fit.points) / (m - 2)
    mean = sum(b for b, _ in fit.points) / m
    sxx = sum((b - mean) ** 2 for b, _ in fit.points)
    return (residual * (1 / m + (k - mean) ** 2 / sxx)) ** 0.5


def decided_speedup(search: dict) -> tuple[float, float]:
    """(speedup, spread) of the depth a search decided: the pooled line's, or its probe's own measurement."""
    if "speedup" in search:
        return search["speedup"], search["spread"]
    attempt = next(a for a in search["attempts"] if a["blocks_removed"] == search["k"])
    return attempt["measured"], attempt["spread"]
