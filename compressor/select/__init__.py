"""Block selection: which blocks to remove, and the linear maps that replace removed spans.

- `search`: `plan_blocks(model, windows, ks, strategy)`, the one entry point, and `PlanSearch`;
- `registry`: what a strategy receives and returns (`SelectContext`, `Choice`) and `register`;
- `strategies`: the baselines (linearity, influence, angular, greedy); `auto`: ours;
- `scoring`: measured calibration loss of a model as a plan would leave it;
- `maps`: fitting the linear replacement of a span in closed form;
- `linear`: replacing blocks the user names (`linearize_`);
- `compare`: strategies side by side on held-out text.
"""

from compressor.select.search import (
    STRATEGIES,
    Choice,
    PlanSearch,
    SelectContext,
    SelectSettings,
    Strategy,
    check_k,
    get_strategy,
    plan_blocks,
    register,
)

__all__ = ["STRATEGIES", "Choice", "PlanSearch", "SelectContext", "SelectSettings", "Strategy", "check_k",
           "get_strategy", "plan_blocks", "register"]
