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
    heal_local: float | None
    quantization_aware: str | None


def heal_stage(run, student, windows, plan: PlanInputs, precision: str = "fp32") -> dict | None:
    """Heal `student` (the plan `plan` keys applied) in place against the original; its result as a
    dictionary (None: no healing, or nothing removed to heal). With --heal-quantization-aware and an
    int8/int4 `precision`, through that export's fake quantizer (compress heal --quantization-aware):
    the export then writes the integers it trained. The teacher's targets go to compress heal's own
    teacher cache, so local reconstruction and distillation share one teacher pass (and a rerun reuses it);
    a run that writes nothing keeps them in its temporary work directory instead."""
    cfg = run.cfg
    if cfg.heal_steps <= 0 or plan.blocks == 0:
        return None
    from compressor.heal import HealConfig, heal
    from compressor.util.io import optional_cache_dir

    aware = precision if cfg.heal_quantization_aware and precision in ("int8", "int4") else None
    status(f"healing ({cfg.heal_steps} steps, at most {cfg.heal_minutes} min"
           + (f", through the {aware} quantizer)" if aware else ")"))
    cache = optional_cache_dir("teacher-logits") if run.runner.persistent else run.work / "teacher-cache"
    state = run.work / f"heal-state-{key_of(inputs_of(HealInputs, cfg, plan=plan, quantization_aware=aware))}"
    config = HealConfig(steps=cfg.heal_steps, max_minutes=cfg.heal_minutes, train=cfg.heal_train, lr=cfg.heal_lr,
                        local=cfg.heal_local, teacher_cache=cache,
                        checkpoint_dir=state, resume=state.exists(), quantization_aware=aware)
    start = time.perf_counter()
    result = heal(student, run.model, windows, None, config)
    run.runner.seconds["heal"] = round(time.perf_counter() - start, 2)
    return result.to_dict()
