"""LoRA through peft (an optional extra): adapters on every Linear layer of the blocks, merged back
into plain weights before anything is saved, so the healed checkpoint never needs peft."""

from __future__ import annotations

import logging
import warnings

import torch

from compressor.errors import require
from compressor.heal.trainable import lora_targets

log = logging.getLogger(__name__)


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, seed: int = 0):
    """Wrap `model` in a peft model with LoRA adapters; only the adapters are trainable.

    Returns the peft wrapper. `wrapper.get_base_model()` is `model` itself, with the adapters
    injected in place, so hooks and block paths keep working on it.
    """
    peft = require("peft", "heal", "LoRA healing")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                             target_modules=lora_targets(model), bias="none")
    targets = len(config.target_modules)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers about a renamed attribute
        torch.manual_seed(seed)  # LoRA's A matrices are random: same seed, same start, same run
        wrapper = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d layers: %d trainable parameters", rank, targets, trainable)
    return wrapper


def merge_lora(wrapper) -> torch.nn.Module:
    """Fold the adapters into the weights and return the plain model (the same object as before)."""
    model = wrapper.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return model
