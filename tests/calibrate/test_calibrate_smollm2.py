"""The real SmolLM2-135M over the bundled text: the paper's shape, and Gram statistics that agree
with the stored-activation SVD formula despite massive activations."""

from __future__ import annotations

import pytest
import torch
from calibrate_refs import direct

from compressor.calibrate import calibrate
from compressor.data import load_texts, make_windows

pytestmark = pytest.mark.smollm2


def test_profile_shape_and_agreement(smollm2_pair):
    model, tokenizer = smollm2_pair
    windows = make_windows(tokenizer, load_texts(None), samples=8, seq_len=128, seed=0)
    profile = calibrate(model, windows, batch_size=8, spans_max=4)
    blocks = profile.blocks
    assert profile.tokens == 1024 and len(blocks) == 30
    middle = blocks[len(blocks) // 4: 3 * len(blocks) // 4]
    assert all(b.linearity > 0.9 for b in middle)
    with_res = sum(b.linearity for b in middle) / len(middle)
    without = sum(b.linearity_without_residual for b in middle) / len(middle)
    assert without < with_res - 0.05  # 1024 tokens in 576 dims inflate both; the gap is what the paper shows

    # Massive activations: from block 12 the first token of every window is an outlier.
    assert all(b.outlier_tokens >= 8 for b in blocks[12:28])
    assert all(b.linearity_no_outliers < b.linearity for b in blocks[12:28])
    assert blocks[12].anisotropy > 0.9 > blocks[12].anisotropy_no_outliers

    with torch.no_grad():
        hs = model(windows, output_hidden_states=True, use_cache=False).hidden_states
    states = [h.reshape(-1, h.shape[-1]).double() for h in hs[:-1]]  # the last is after the norm
    for b in [blocks[i] for i in (0, 6, 11, 12, 20, 27)]:
        x, y = states[b.index], states[b.index + 1]
        assert b.linearity == pytest.approx(direct(x, y), abs=1e-6)
        assert b.linearity_without_residual == pytest.approx(direct(x, y - x), abs=1e-6)
