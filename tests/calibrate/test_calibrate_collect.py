"""Hook statistics against a direct computation from the model's own hidden states."""

from __future__ import annotations

import math

import pytest
import torch
from calibrate_refs import direct, hidden_states
from conftest import tiny_model

from compressor.calibrate import calibrate
from compressor.calibrate.collect import collect
from compressor.calibrate.stats import Stats

F64 = torch.float64


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(0))


def test_hook_stats_equal_direct(llama, windows):
    stats, _ = collect(llama, windows, batch_size=4, pairs=[(0, 3), (1, 4)])
    hs = hidden_states(llama, windows)
    assert stats.tokens == windows.numel()
    for i, h in enumerate(hs):
        torch.testing.assert_close(stats.grams[i], h.T @ h, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(stats.sums[i], h.sum(0), rtol=1e-10, atol=1e-9)
    for (i, j), cross in stats.cross.items():
        torch.testing.assert_close(cross, hs[i].T @ hs[j], rtol=1e-10, atol=1e-9)
    for l in range(len(hs) - 1):
        x, y = hs[l], hs[l + 1]
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1)
        assert float(stats.cos_sum[l]) == pytest.approx(float(cos.sum()), rel=1e-6)  # float32 per token
        contrib = ((y - x).norm(dim=1) / x.norm(dim=1)).sum()
        assert float(stats.contrib_sum[l]) == pytest.approx(float(contrib), rel=1e-6)


def test_profile_matches_direct_formulas(llama, windows):
    profile = calibrate(llama, windows, batch_size=4, spans_max=2)
    hs = [h.numpy() for h in hidden_states(llama, windows)]
    for b in profile.blocks:
        x, y = hs[b.index], hs[b.index + 1]
        assert b.linearity == pytest.approx(direct(x, y), abs=1e-9)
        assert b.linearity_without_residual == pytest.approx(direct(x, y - x), abs=1e-9)
    last = torch.stack([torch.as_tensor(h).view(6, 24, -1)[:, -1] for h in hs], dim=1)
    cos = torch.nn.functional.cosine_similarity(last[:, 1], last[:, 3], dim=-1)
    expected = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
    assert profile.span(1, 2) == pytest.approx(expected, abs=1e-9)
    assert [(s.start, s.length) for s in profile.spans][:5] == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2)]


def test_merge_equals_whole(llama, windows):
    whole, _ = collect(llama, windows, batch_size=3)
    first, _ = collect(llama, windows[:2], batch_size=2)
    second, _ = collect(llama, windows[2:], batch_size=5)
    merged = first + second
    for a, b in zip(merged._tensors(), whole._tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)


def test_save_and_load(llama, windows, tmp_path):
    stats, _ = collect(llama, windows, batch_size=6, outlier_factor=1.2)
    assert stats.outliers, "factor 1.2 should flag some tokens"
    stats.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors")
    assert back.outlier_factor == 1.2 and sorted(back.outliers) == sorted(stats.outliers)
    for a, b in zip(back._tensors(), stats._tensors(), strict=True):
        assert torch.equal(a, b)


def test_outlier_statistics_equal_direct_exclusion(llama, windows):
    factor = 1.3
    stats, _ = collect(llama, windows, batch_size=4, outlier_factor=factor)
    hs = hidden_states(llama, windows)
    flags = []
    for h in hs:
        norms = h.norm(dim=1).view(windows.shape).float()
        flags.append((norms > factor * norms.median(dim=1, keepdim=True).values).reshape(-1))
    checked = 0
    for l in range(len(hs) - 1):
        keep = ~(flags[l] | flags[l + 1])
        assert stats.outlier_count(l, l + 1) == int((~keep).sum())
        x, y = hs[l][keep], hs[l + 1][keep]
        clean = stats.block(l, outliers=False)
        assert clean.n == keep.sum()
        torch.testing.assert_close(clean.xy, x.T @ y, rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(clean.yy, y.T @ y, rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(clean.sx, x.sum(0), rtol=1e-9, atol=1e-8)
        checked += int((~keep).sum() > 0)
    assert checked > 0


def test_padding_enters_no_statistic(llama):
    """Right-padded windows with a mask give exactly the statistics of the real tokens alone."""
    g = torch.Generator().manual_seed(1)
    full = torch.randint(3, 128, (2, 16), generator=g)
    short = torch.randint(3, 128, (1, 9), generator=g)
    padded = torch.cat([full, torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[2, 9:] = 0
    both, _ = collect(llama, padded, mask, batch_size=3, outlier_factor=1.3)
    alone = collect(llama, full, batch_size=2, outlier_factor=1.3)[0] + collect(llama, short, outlier_factor=1.3)[0]
    assert both.tokens == 2 * 16 + 9
    for a, b in zip(both._tensors(), alone._tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-6)
    for key in alone.outliers:
        torch.testing.assert_close(both.outliers[key], alone.outliers[key], rtol=1e-7, atol=1e-6)


def test_every_architecture_hooks(arch):
    """Every adapter row: the hooks see h_0..h_{L-1} as output_hidden_states does."""
    model = tiny_model(arch)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    stats, _ = collect(model, ids, batch_size=2)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(len(hs) - 1):
        h = hs[i].reshape(-1, hs[i].shape[-1]).to(F64)
        torch.testing.assert_close(stats.grams[i], h.T @ h, rtol=1e-6, atol=1e-5)
    profile = calibrate(model, ids, spans_max=2)
    assert all(0.0 <= b.linearity <= 1.0 + 1e-9 for b in profile.blocks)


def test_hooks_are_removed_even_on_error(llama, windows):
    from compressor.adapters import get_adapter

    blocks = get_adapter(llama).blocks_of(llama)
    before = [len(b._forward_hooks) for b in blocks]
    with pytest.raises(RuntimeError):
        collect(llama, windows.float(), batch_size=2)  # float ids: the embedding fails
    assert [len(b._forward_hooks) for b in blocks] == before


def test_intrinsic_dim_is_reported(llama, windows):
    profile = calibrate(llama, windows, intrinsic_dim=True, twonn_points=100)
    assert all(b.intrinsic_dim is not None and b.intrinsic_dim > 0 for b in profile.blocks)


def test_device_map_split_gives_the_same_profile(llama, windows):
    """accelerate's dispatch hooks (forced on although both halves are on the CPU) change nothing."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    reference = calibrate(llama, windows, batch_size=3)
    split = copy.deepcopy(llama)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(4)}
    split = accelerate.dispatch_model(split, device_map=device_map, force_hooks=True)
    assert hasattr(split.model.layers[2], "_hf_hook")
    profile = calibrate(split, windows, batch_size=3)
    for a, b in zip(profile.blocks, reference.blocks, strict=True):
        assert a.linearity == pytest.approx(b.linearity, abs=1e-12)
        assert a.block_influence == pytest.approx(b.block_influence, abs=1e-12)
