"""Healing a pruned model: distillation from its unpruned teacher, and the paper's cosine regularizer.

    from compressor.heal import HealConfig, heal
    result = heal(student, teacher, train_windows, eval_windows, HealConfig(steps=200, max_minutes=15))
"""

from compressor.heal.config import HealConfig, HealResult
from compressor.heal.losses import (
    LinearityRegularizer,
    capture_hidden_states,
    consecutive_cosine,
    hidden_loss,
    kd_loss,
    lm_loss,
    topk_kd_loss,
)
from compressor.heal.train import heal, window_perplexity

__all__ = [
    "HealConfig", "HealResult", "LinearityRegularizer", "capture_hidden_states", "consecutive_cosine",
    "heal", "hidden_loss", "kd_loss", "lm_loss", "topk_kd_loss", "window_perplexity",
]
