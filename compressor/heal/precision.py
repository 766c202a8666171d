"""The precision healing trains in: bfloat16 autocast where the device computes it natively, fp32 elsewhere."""

from __future__ import annotations

import contextlib

import torch

from compressor.heal.config import HealConfig


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where autocast pays off.

    Elsewhere bf16 is emulated and slower than fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: torch.device, config: HealConfig) -> torch.dtype | None:
    """bfloat16 for training on CUDA and on CPUs that compute it natively; None (fp32) elsewhere."""
    if not config.autocast:
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16()):
        return torch.bfloat16
    return None


def autocast(runtime, config: HealConfig, training: bool = True):
    """Training runs in bf16 autocast where it is native; evaluation on CPU stays in fp32, so its
    perplexities compare with every other fp32 evaluation in the tool."""
    dtype = autocast_dtype(runtime.device, config)
    if dtype is None or (not training and runtime.device.type == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=dtype)
