"""Shared pieces for the healing tests: a tiny teacher, its pruned student, and token windows."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from compressor.surgery.edit import drop_blocks_

VOCAB = 128


def pair(model_type: str = "llama", drop=(1,), seed: int = 0):
    """(teacher, student): a tiny random model and a copy with `drop` removed by the surgery."""
    teacher = tiny_model(model_type, seed=seed)
    student = copy.deepcopy(teacher)
    drop_blocks_(student, list(drop))
    return teacher, student


def windows(n: int = 16, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and a shared 2-core machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
