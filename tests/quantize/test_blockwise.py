"""Block quantization formulas, checked against direct numpy arithmetic."""

import numpy as np
import pytest

from compressor.quantize import blockwise


def _weight(k=80, n=12, seed=0):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _blocks(w, bs):
    """[K, N] -> [N, n_blocks, bs] with zero padding, written out independently of the module."""
    k, n = w.shape
    nb = -(-k // bs)
    out = np.zeros((n, nb * bs), dtype=np.float32)
    out[:, :k] = w.T
    return out.reshape(n, nb, bs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_a_step(bits, symmetric):
    w = _weight()
    q = blockwise.rtn(w, bits, 32, symmetric)
    blocks = _blocks(w, 32)
    if symmetric:  # the value of largest magnitude maps to the bottom code
        m = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale = m / -(2 ** (bits - 1))
    else:
        scale = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / (2**bits - 1)
    np.testing.assert_allclose(q.scales, scale, rtol=1e-6)
    err = np.abs(_blocks(q.dequantize(), 32) - blocks)
    step = np.broadcast_to(np.abs(scale)[..., None], err.shape)
    # The symmetric grid has one code fewer above zero (in units of scale): values past it clip.
    clipped = blocks / scale[..., None] > 2 ** (bits - 1) - 0.5 if symmetric else np.zeros_like(err, bool)
    assert np.all(err[~clipped] <= (step / 2 * (1 + 1e-5) + 1e-7)[~clipped])
    assert np.all(err[clipped] <= (step * (1 + 1e-5))[clipped])
    assert q.codes.max() <= 2**bits - 1
    assert q.dequantize().shape == w.shape


def test_pack_nibbles_low_first():
    w = _weight(64, 3)
    q = blockwise.rtn(w, 4, 32, symmetric=False)
    packed, scales, zp = blockwise.pack(q)
    assert packed.shape == (3, 2, 16) and scales.shape == (3, 2) and zp.shape == (3, 1)
    np.testing.assert_array_equal(packed & 0xF, q.codes[..., 0::2])
    np.testing.assert_array_equal(packed >> 4, q.codes[..., 1::2])
    np.testing.assert_array_equal(zp[:, 0] & 0xF, q.zero_points[:, 0])
    np.testing.assert_array_equal(zp[:, 0] >> 4, q.zero_points[:, 1])


def _inputs(k, tokens, seed=1, draw=0):
    """Correlated inputs, as real activations are: one mixing matrix per `seed`, fresh tokens per `draw`."""
    mix = np.random.default_rng(seed).standard_normal((k, k)) / np.sqrt(k)
    rng = np.random.default_rng([seed, draw])
    return rng.standard_normal((tokens, k)) @ mix + 0.3 * rng.standard_normal((tokens, k))


def _hessian(k, tokens=512, seed=1):
    x = _inputs(k, tokens, seed)
    return x, x.T @ x


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_output_error_against_rtn_on_held_out_inputs(bits):
    """The Hessian comes from one draw of tokens; the error is measured on another draw of the same
    distribution, so GPTQ cannot win by fitting the very tokens it is scored on."""
    w = _weight(96, 40)
    _, h = _hessian(96)
    held = _inputs(96, 512, draw=1)
    ref = held @ w
    err_rtn = np.linalg.norm(held @ blockwise.rtn(w, bits, 32, True).dequantize() - ref)
    err_gptq = np.linalg.norm(held @ blockwise.gptq(w, h, bits, 32, True).dequantize() - ref)
    assert err_gptq < 0.9 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """With H = c * I there is no error to push onto other rows: GPTQ reduces to round-to-nearest."""
    w = _weight(70, 9)
    for symmetric in (True, False):
        g = blockwise.gptq(w, 5.0 * np.eye(70), 4, 32, symmetric, damp=0.0)
        r = blockwise.rtn(w, 4, 32, symmetric)
        # codes of the rows padded to whole blocks are not read; ORT leaves them 0
        np.testing.assert_array_equal(g.codes.reshape(9, -1)[:, :70], r.codes.reshape(9, -1)[:, :70])
        np.testing.assert_allclose(g.scales, r.scales, rtol=1e-6)


def test_gptq_handles_dead_inputs():
    w = _weight(64, 8)
    _x, h = _hessian(64)
    h[5, :] = h[:, 5] = 0  # an input that is always zero
    q = blockwise.gptq(w, h, 4, 32, True)
    assert np.all(np.isfinite(q.dequantize()))


def test_clip_search_beats_rtn_by_5_percent_on_heavy_tailed_weights():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, (128, 24)).astype(np.float32)  # heavy tails: clipping pays off
    importance = rng.random(128) ** 4
    def cost(q):
        return float((((q.dequantize() - w) ** 2) * importance[:, None]).sum())
    for symmetric in (True, False):
        plain, searched = blockwise.rtn(w, 4, 32, symmetric), blockwise.rtn_search(w, importance, 4, 32, symmetric)
        assert cost(searched) < 0.95 * cost(plain)
        if not symmetric:
            continue
        step = np.repeat(np.abs(searched.scales).T, 32, axis=0)[:128]
        inside = np.abs(w) <= 7 * step  # unclipped weights still round to the nearest step
        assert np.all(np.abs(searched.dequantize() - w)[inside] <= step[inside] * (0.5 + 1e-4))


def test_gptq_of_concatenated_weights_is_gptq_of_each():
    """Output columns are independent given H: batching and concatenation change nothing."""
    a, b = _weight(64, 10, seed=3), _weight(64, 6, seed=4)
    _, h = _hessian(64)
    joint = blockwise.split(blockwise.gptq(np.concatenate([a, b], axis=1), h, 4, 32, True), [10, 6])
    batched = blockwise.gptq_many([a, a], [h, h], 4, 32, True)
    for part, w in zip(joint, (a, b)):
        np.testing.assert_allclose(part.dequantize(), blockwise.gptq(w, h, 4, 32, True).dequantize(), atol=1e-6)
    np.testing.assert_array_equal(batched[0].codes, batched[1].codes)


def test_gptq_with_a_massive_token_in_its_calibration_set_still_beats_rtn_on_held_out_tokens():
    """One 150x first token per window (SmolLM2's massive activation, on 4 channels): counted at full
    weight it owns the Hessian and GPTQ loses to rounding on every other token; clipped to 4x the
    median token norm (what quantize_onnx does for GPTQ), GPTQ wins again. Scored on fresh windows."""
    import torch

    from compressor.quantize.calibration import clip_token_norms

    k, n = 128, 64
    mix = np.random.default_rng(0).standard_normal((k, k)) / np.sqrt(k)

    def windows(count, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((count, 64, k)) @ mix + 0.3 * rng.standard_normal((count, 64, k))
        x[:, 0, :4] = 150.0 * np.sign(rng.standard_normal((count, 4)))
        return x

    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    calib = windows(4, 1).reshape(-1, k)
    typical = windows(16, 2)[:, 1:].reshape(-1, k)  # held out: the tokens after each window's first

    def error(q):
        return np.linalg.norm(typical @ q.dequantize() - typical @ w) / np.linalg.norm(typical @ w)

    clipped = clip_token_norms(torch.from_numpy(calib), 4.0).numpy()
    assert np.linalg.norm(clipped, axis=1).max() <= 4.0 * np.median(np.linalg.norm(calib, axis=1)) * (1 + 1e-9)
    rtn = error(blockwise.rtn(w, 4, 32, "minmax"))
    plain = error(blockwise.gptq(w, calib.T @ calib, 4, 32, "minmax"))
    robust = error(blockwise.gptq(w, clipped.T @ clipped, 4, 32, "minmax"))
    assert plain > 1.5 * rtn  # the failure mode
    assert robust < 0.95 * rtn
