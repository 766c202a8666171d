"""Side-by-side quality of selection strategies: perplexity of each plan next to the unpruned model.

Every plan is applied to a fresh copy of the model (maps really folded, blocks really removed) and
scored with `compressor.evaluate.perplexity` on the same tokens. Training-free: nothing is tuned on
the evaluation text. Profile-based strategies share one profile; measured strategies search once
to the largest K.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from compressor.blocks import ranges_text
from compressor.select.search import SelectSettings, get_strategy, plan_blocks
from compressor.surgery.plan import Plan, applied_copy
from compressor.util.progress import status

log = logging.getLogger(__name__)

DEFAULT_STRATEGIES = ("influence", "linearity", "angular", "greedy", "auto")


@dataclass
class Row:
    k: int
    strategy: str
    linear: bool
    perplexity: float
    drop: list[int]
    linearize: list[dict]
    seconds: float              # making the plan: profile + selection + fitting
    loss_evaluations: int
    eval_seconds: float

    @property
    def label(self) -> str:
        return self.strategy + (" + linear" if self.linear else "")


@dataclass
class StrategyComparison:
    baseline: float
    eval_tokens: int
    max_length: int
    stride: int
    rows: list[Row] = field(default_factory=list)
    profile_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"unpruned": self.baseline, "eval_tokens": self.eval_tokens, "max_length": self.max_length,
                "stride": self.stride, "profile_seconds": self.profile_seconds,
                "rows": [asdict(r) | {"label": r.label} for r in self.rows]}

    def best(self, k: int) -> Row:
        return min((r for r in self.rows if r.k == k), key=lambda r: r.perplexity)

    def markdown(self) -> str:
        ks = sorted({r.k for r in self.rows})
        labels = list(dict.fromkeys(r.label for r in self.rows))
        lines = [(f"unpruned: {self.baseline:.2f} (perplexity, {self.eval_tokens} tokens, "
                 f"windows {self.max_length}/{self.stride})"), "",
                 "| strategy | " + " | ".join(f"K={k}" for k in ks) + " |",
                 "|---|" + "---|" * len(ks)]
        for label in labels:
            cells = []
            for k in ks:
                row = next((r for r in self.rows if r.k == k and r.label == label), None)
                cells.append("" if row is None else f"{row.perplexity:.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| K | strategy | perplexity | removed | linear spans | plan seconds | loss evals |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (r.k, labels.index(r.label))):
            spans = ", ".join(f"{s['start']}-{s['end'] - 1}" for s in r.linearize) or "-"
            lines.append(f"| {r.k} | {r.label} | {r.perplexity:.2f} | {ranges_text(r.drop)} | {spans} | "
                         f"{r.seconds:.0f} | {r.loss_evaluations} |")
        return "\n".join(lines)


def compare_strategies(model, windows: torch.Tensor, eval_ids: torch.Tensor, ks: list[int],
                       strategies=DEFAULT_STRATEGIES, variants: tuple[bool, ...] = (False, True),
                       settings: SelectSettings | None = None, max_length: int = 512, stride: int = 256,
                       profile=None, on_row=None, batch_size: int = 4) -> StrategyComparison:
    """Perplexity on `eval_ids` of every (K, strategy, with/without linear maps) plan."""
    from compressor.calibrate import profile_for
    from compressor.evaluate import perplexity

    for name in strategies:
        get_strategy(name)
    status("perplexity of the unpruned model")
    base = perplexity(model, eval_ids, max_length, stride, batch_size)
    result = StrategyComparison(base.perplexity, base.tokens, max_length, stride)
    if profile is None and any(get_strategy(s).needs_profile for s in strategies):
        start = time.perf_counter()
        profile = profile_for(model, windows)
        result.profile_seconds = time.perf_counter() - start
    for name in strategies:
        search = plan_blocks(model, windows, ks, name, profile=profile,
                             settings=replace(settings or SelectSettings(), linear=variants[0]))
        plans = {(k, linear): variant[k] for linear in variants for variant in [search.with_linear(linear)]
                 for k in variant}
        for (k, linear), plan in sorted(plans.items()):
            row = _evaluate(model, plan, k, linear, eval_ids, max_length, stride, result.profile_seconds, batch_size)
            result.rows.append(row)
            log.info("K=%d %s: perplexity %.3f (removed %s)", k, row.label, row.perplexity, ranges_text(row.drop))
            if on_row is not None:
                on_row(row)
    return result


def _evaluate(model, plan: Plan, k: int, linear: bool, eval_ids, max_length: int, stride: int,
              profile_seconds: float, batch_size: int) -> Row:
    from compressor.evaluate import perplexity

    pruned = applied_copy(model, plan)
    start = time.perf_counter()
    ppl = perplexity(pruned, eval_ids, max_length, stride, batch_size).perplexity
    del pruned
    seconds = plan.cost.get("seconds", 0.0)
    if get_strategy(plan.strategy).needs_profile and not plan.cost.get("profile_seconds"):
        seconds += profile_seconds  # the shared profile counts for every strategy that read it
    return Row(k, plan.strategy, linear, ppl, plan.drop, plan.linearize, round(seconds, 2),
               plan.cost.get("loss_evaluations", 0), round(time.perf_counter() - start, 2))
