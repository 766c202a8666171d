"""The healing stage: a short distillation from the original, resumable from its own training state."""

from __future__ import annotations

import time
from dataclasses import dataclass

from compressor.pipeline.plan import PlanInputs
from compressor.pipeline.runner import inputs_of, key_of
from compressor.util.progress import status


@dataclass(frozen=True)
class HealInputs:
    plan: PlanInputs
    heal_steps: int
    heal_minutes: float
    heal_train: str
    heal_lr: float | None


def heal_stage(run, student, windows, plan: PlanInputs) -> dict | None:
    """Heal `student` (the plan `plan` keys applied) in place against the original; its result as a
    dictionary (None: no healing, or nothing removed to heal)."""
    cfg = run.cfg
    if cfg.heal_steps <= 0 or plan.blocks == 0:
        return None
    from compressor.heal import HealConfig, heal

    status(f"healing ({cfg.heal_steps} steps, at most {cfg.heal_minutes} min)")
    state = run.work / f"heal-state-{key_of(inputs_of(HealInputs, cfg, plan=plan))}"
    config = HealConfig(steps=cfg.heal_steps, max_minutes=cfg.heal_minutes, train=cfg.heal_train, lr=cfg.heal_lr,
                        checkpoint_dir=state, resume=state.exists())
    start = time.perf_counter()
    result = heal(student, run.model, windows, None, config)
    run.runner.seconds["heal"] = round(time.perf_counter() - start, 2)
    return result.to_dict()
