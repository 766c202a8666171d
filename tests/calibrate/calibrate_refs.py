"""Independent references for the calibrate tests: the paper's formula on stored matrices, and
hidden states straight from the model."""

from __future__ import annotations

import numpy as np
import torch


def direct(x, y) -> float:
    """The paper's score, exactly as written: centre, unit Frobenius norm, lstsq (SVD-based, float64),
    1 - residual. One thread: multi-threaded LAPACK thrashes on a busy 2-core machine."""
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = x - x.mean(0)
        y = y - y.mean(0)
        x, y = x / torch.linalg.norm(x), y / torch.linalg.norm(y)
        a = torch.linalg.lstsq(x, y, driver="gelsd").solution
        return float(1.0 - torch.linalg.norm(x @ a - y) ** 2)
    finally:
        torch.set_num_threads(threads)


def hidden_states(model, windows, mask=None) -> list[torch.Tensor]:
    """h_0..h_L of a tiny Llama as float64 [tokens, d], from output_hidden_states (whose last entry
    is after the final norm: that one is recomputed with the norm swapped for identity)."""
    with torch.no_grad():
        states = list(model(windows, attention_mask=mask, output_hidden_states=True).hidden_states)
        norm, model.model.norm = model.model.norm, torch.nn.Identity()
        try:
            states[-1] = model(windows, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        finally:
            model.model.norm = norm
    return [h.reshape(-1, h.shape[-1]).to(torch.float64) for h in states]
