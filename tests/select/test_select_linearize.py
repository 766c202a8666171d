"""Linear replacement: the fit against direct least squares, the fold against applying the map after
the projection, on every architecture in the adapter table."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from compressor.adapters import get_adapter
from compressor.errors import InvalidPlanError
from compressor.info import count_parameters
from compressor.select.linear import linear_plan
from compressor.select.maps import (
    FitSettings,
    NormalEquations,
    Projection,
    accumulate,
    fit_spans,
    folded_outputs,
    token_mask,
)
from compressor.surgery.edit import drop_blocks_, fold_linear_, save_checkpoint, set_projection_
from compressor.surgery.plan import apply_plan_

F64 = torch.float64


def windows(n=4, t=12, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_streaming_fit_recovers_a_planted_map_exactly():
    g = torch.Generator().manual_seed(0)
    T = torch.randn(16, 16, generator=g, dtype=F64)
    eq = NormalEquations(16)
    for _ in range(5):  # streamed in chunks, as batches arrive
        x = torch.randn(40, 16, generator=g, dtype=F64)
        eq.add(x, x @ T)
    fitted = eq.solve(ridge=0.0)
    torch.testing.assert_close(fitted, T, rtol=1e-9, atol=1e-9)
    assert eq.tokens == 200 and eq.relative_error(fitted) < 1e-18


def test_ridge_is_relative_to_the_gram_trace():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g, dtype=F64)
    y = torch.randn(100, 8, generator=g, dtype=F64)
    small, big = NormalEquations(8), NormalEquations(8)
    small.add(x, y)
    big.add(1000 * x, 1000 * y)  # same problem at another scale: same solution
    torch.testing.assert_close(small.solve(0.1), big.solve(0.1))
    lam, eye = 0.1 * float((x * x).sum()) / 8, torch.eye(8, dtype=F64)
    # Ridge pulls towards the identity (unexcited directions pass through as with a plain drop).
    torch.testing.assert_close(small.solve(0.1), torch.linalg.solve(x.T @ x + lam * eye, x.T @ y + lam * eye))


def test_token_mask_leaves_out_padding_first_tokens_and_outliers():
    h = torch.ones(2, 6, 4)
    h[1, 3] *= 1000  # a massive activation
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    keep = token_mask((2, 6), mask, [h], exclude_first=True, outlier_factor=20.0)
    assert keep.tolist() == [[False, True, True, True, True, True], [False, False, True, False, True, True]]


def _direct_fit(model, ids, owner, last, ridge):
    """Reference: hidden states from output_hidden_states, M from a hook, solve in float64."""
    adapter = get_adapter(model)
    seen = {}
    proj = adapter.mlp_out_of(adapter.blocks_of(model)[owner])
    handle = proj.register_forward_hook(lambda m, a, out: seen.setdefault("m", out))
    try:
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    x = seen["m"].reshape(-1, seen["m"].shape[-1]).to(F64)
    y = (hs[last + 1].to(F64) - hs[owner + 1].to(F64)).reshape(-1, x.shape[-1]) + x
    lam, eye = ridge * float((x * x).sum()) / x.shape[1], torch.eye(x.shape[1], dtype=F64)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y + lam * eye)


def test_hooked_fit_matches_direct_least_squares():
    model = tiny_model("llama")
    ids = windows()
    eq = accumulate(model, ids, [(0, 2)], FitSettings(ridge=1e-3, batch_size=4))[(0, 2)]
    assert eq.tokens == 4 * 12 and eq.excluded == 0
    left_out = accumulate(model, ids, [(0, 2)], FitSettings(exclude_first=True))[(0, 2)]
    assert left_out.tokens == 4 * 11 and left_out.excluded == 4
    torch.testing.assert_close(eq.solve(1e-3), _direct_fit(model, ids, 0, 2, 1e-3), rtol=1e-6, atol=1e-8)


def test_fold_equals_applying_the_map_after_the_projection(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    reason = adapter.why_no_fold(model.config)
    T = torch.eye(32, dtype=F64) + 0.2 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=F64)
    if reason:
        with pytest.raises(InvalidPlanError, match="cannot fold") as exc:
            fold_linear_(model, 1, T)
        assert reason in str(exc.value)
        return
    ids = windows(2, 9)
    proj = adapter.mlp_out_of(adapter.blocks_of(model)[1])
    handle = proj.register_forward_hook(lambda m, a, out: (out.double() @ T).to(out.dtype))
    with torch.no_grad():
        expected = model(ids).logits
    handle.remove()
    fold_linear_(model, 1, T)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_refitted_projection_equals_its_readout_on_the_input(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    proj = adapter.mlp_out_of(adapter.blocks_of(model)[2])
    d_in = proj.weight.shape[1] if isinstance(proj, torch.nn.Linear) else proj.weight.shape[0]
    g = torch.Generator().manual_seed(4)
    new = Projection(0.1 * torch.randn(d_in, 32, generator=g, dtype=F64),
                     torch.randn(32, generator=g, dtype=F64) if getattr(proj, "bias", None) is not None else None)
    if adapter.why_no_fold(model.config):
        with pytest.raises(InvalidPlanError, match="cannot refit"):
            set_projection_(model, 2, new.weight, new.bias)
        return
    ids = windows(2, 9)
    handle = proj.register_forward_hook(lambda m, a, out: (a[0].double() @ new.weight + (
        0 if new.bias is None else new.bias)).to(out.dtype).reshape(out.shape))
    with torch.no_grad():
        expected = model(ids).logits
        handle.remove()
        with folded_outputs(model, {2: new}):
            hooked = model(ids).logits
        set_projection_(model, 2, new.weight, new.bias)
        got = model(ids).logits
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # without and with a bias
def test_projection_form_matches_direct_least_squares_with_intercept(arch):
    model = tiny_model(arch)
    ids = windows(16, 16)  # 256 tokens for an input up to 128 (+1) wide
    adapter = get_adapter(model)
    proj = adapter.mlp_out_of(adapter.blocks_of(model)[0])
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, out: seen.update(a=a[0], m=out))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    x = seen["a"].reshape(-1, seen["a"].shape[-1]).to(F64)
    y = (hs[3].to(F64) - hs[1].to(F64)).reshape(-1, 32) + seen["m"].reshape(-1, 32).to(F64)
    has_bias = getattr(proj, "bias", None) is not None
    if has_bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], dim=1)
    expected = torch.linalg.lstsq(x, y).solution
    fit = fit_spans(model, ids, [1, 2], [(1, 3)], FitSettings(form="projection", ridge=0.0, batch_size=4))[0]
    got = fit.replacement.weight if not has_bias else torch.cat([fit.replacement.weight, fit.replacement.bias[None]])
    assert fit.form == "projection"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_spans_starting_at_block_zero_are_refused():
    model = tiny_model("llama")
    with pytest.raises(InvalidPlanError, match="at block 0"):
        linear_plan(model, "0-1", windows())
    with pytest.raises(InvalidPlanError, match="starts at block 0"):
        accumulate(model, windows(), [(-1, 1)])


def test_adapters_that_cannot_fold_refuse_with_their_reason():
    model = tiny_model("gemma2")
    with pytest.raises(InvalidPlanError, match="post_feedforward_layernorm"):
        linear_plan(model, "1-2", windows())


@pytest.mark.parametrize("form", ["map", "projection"])
def test_folded_model_has_the_parameters_of_the_plain_drop_and_reloads(tmp_path, form):
    model = tiny_model("llama", num_hidden_layers=6)
    plan = linear_plan(model, "2-3,5", windows(8, 16), FitSettings(form=form))
    assert {s["form"] for s in plan.linearize} == {form}
    assert plan.spans == [(2, 4), (5, 6)]
    plain = tiny_model("llama", num_hidden_layers=6)
    drop_blocks_(plain, [2, 3, 5])
    apply_plan_(model, plan)
    assert count_parameters(model) == count_parameters(plain)
    assert model.config.compressor["linearized"] == [{"start": 2, "end": 4}, {"start": 5, "end": 6}]
    save_checkpoint(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        assert not torch.allclose(plain(ids).logits, model(ids).logits)


def test_later_spans_are_fitted_on_the_model_with_earlier_spans_applied():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = windows(6, 16)
    settings = FitSettings()
    first, second = fit_spans(model, ids, [1, 3, 4], [(1, 2), (3, 5)], settings)
    eq = accumulate(model, ids, [(2, 4)], settings, drop=[1], maps={0: first.replacement})[(2, 4)]
    # fit_spans resumes from the replaced states instead of re-running blocks: float32 rounding only.
    reference = eq.solve(settings.ridge)
    torch.testing.assert_close(second.replacement, reference, rtol=1e-3, atol=1e-4)
    alone = accumulate(model, ids, [(2, 4)], settings)[(2, 4)].solve(settings.ridge)
    assert (alone - reference).abs().max() > 100 * (second.replacement - reference).abs().max()
