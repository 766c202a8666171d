"""The baseline selection strategies: three that read the calibration profile, one that measures.

- linearity: the K blocks with the highest linearity score (arXiv 2405.12250).
- influence: the K blocks with the lowest block influence, 1 - cos(in, out) (ShortGPT).
- angular:   the contiguous span of K blocks with the least angular distance (Gromov et al.).
- greedy:    K rounds, each removing the block whose removal raises held-out loss least (SLEB).

They choose blocks only; with `linear` on, `compressor.select` fits linear replacements afterwards
(every run of removed blocks that does not start at block 0). `auto` (ours) is in compressor.select.auto.
"""

from __future__ import annotations

import logging

from compressor.blocks import next_kept
from compressor.select.registry import Choice, SelectContext, angular_spans, finite, register

log = logging.getLogger(__name__)


@register("linearity", "the K blocks with the highest linearity score (arXiv 2405.12250)")
def linearity(context: SelectContext, ks: list[int]) -> dict[int, Choice]:
    blocks = context.profile.blocks
    order = sorted(range(context.num_blocks), key=lambda i: (-finite(blocks[i].linearity), i))
    return {k: Choice(sorted(order[:k])) for k in ks}


@register("influence", "the K blocks with the lowest block influence (ShortGPT)")
def influence(context: SelectContext, ks: list[int]) -> dict[int, Choice]:
    blocks = context.profile.blocks
    order = sorted(range(context.num_blocks), key=lambda i: (finite(blocks[i].block_influence, 1e9), i))
    return {k: Choice(sorted(order[:k])) for k in ks}


@register("angular", "the contiguous span of K blocks with the least angular distance (Gromov et al.)")
def angular(context: SelectContext, ks: list[int]) -> dict[int, Choice]:
    starts = {k: angular_spans(context, k, 1, allow_zero=True)[0] for k in ks}
    return {k: Choice(list(range(starts[k], starts[k] + k))) for k in ks}


@register("greedy", "K rounds removing the block that raises held-out loss least (SLEB)",
          measured=True, needs_profile=False)
def greedy(context: SelectContext, ks: list[int]) -> dict[int, Choice]:
    scorer, n = context.scorer, context.num_blocks
    removed: set[int] = set()
    trace, out = [], {}
    for round_ in range(1, max(ks) + 1):
        kept = [i for i in range(n) if i not in removed]
        # One forward records every kept block's input; each candidate restarts from it.
        states = scorer.capture(removed, None, kept)
        losses = {}
        for c in kept:
            after = removed | {c}
            losses[c] = scorer.loss_from(after, None, next_kept(c, after, n), states[f"h{c}"])
        best = min(losses, key=lambda c: (losses[c], c))
        removed.add(best)
        trace.append({"round": round_, "removed": best, "loss": round(losses[best], 5), "evaluated": len(losses)})
        log.info("greedy round %d: removed block %d (held-out loss %.4f)", round_, best, losses[best])
        if round_ in ks:
            out[round_] = Choice(sorted(removed), details={"rounds": list(trace)}, cost=context.cost_so_far())
    return out
