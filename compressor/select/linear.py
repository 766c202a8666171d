"""Replacing blocks the user names by fitted linear maps (`compress linearize`).

    linearize_(model, "12-15", windows)        # fit a map for each run, fold it, remove the blocks

`linear_plan` is the same without editing the model: the Plan, its maps fitted.
"""

from __future__ import annotations

import torch

from compressor.adapters import check_foldable, get_adapter
from compressor.blocks import num_blocks, parse_blocks, runs
from compressor.errors import InvalidPlanError
from compressor.select.maps import FitSettings, fit_provenance, fit_spans
from compressor.surgery.plan import Plan, apply_plan_


def linear_spans(model, blocks) -> tuple[list[int], list[tuple[int, int]]]:
    """Validate blocks to replace ("12-15" or indices): (sorted blocks, runs as [s, e)) or a refusal."""
    drop = parse_blocks(blocks, num_blocks(model))
    check_foldable(model, "replace blocks by a linear map", "use `compress prune --blocks` to drop them instead")
    spans = runs(drop)
    if spans[0][0] == 0:
        raise InvalidPlanError(f"blocks {spans[0][0]}-{spans[0][1] - 1} start at block 0: there is no earlier MLP "
                               "projection to fold a map into; use `compress prune --blocks` for them")
    return drop, spans


def linear_plan(model, blocks, windows: torch.Tensor, settings: FitSettings | None = None,
                attention_mask: torch.Tensor | None = None) -> Plan:
    """A plan replacing the given blocks ("12-15", or indices) by fitted maps, one per run."""
    drop, spans = linear_spans(model, blocks)
    settings = settings or FitSettings()
    fits = fit_spans(model, windows, drop, spans, settings, attention_mask)
    return Plan.from_fits("manual", get_adapter(model).num_blocks(model), drop, fits,
                          provenance={"fit": fit_provenance(settings, fits)})


def linearize_(model, blocks, windows: torch.Tensor, settings: FitSettings | None = None,
               attention_mask: torch.Tensor | None = None) -> Plan:
    """Fit a linear map for each run of `blocks` on `windows`, fold it, and remove the blocks, in place.
    Returns the plan it applied (its provenance says how each map was fitted)."""
    plan = linear_plan(model, blocks, windows, settings, attention_mask)
    apply_plan_(model, plan)
    return plan
