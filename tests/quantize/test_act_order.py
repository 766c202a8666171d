"""GPTQ with act-order and static groups, checked against the direct error formula on held-out inputs,
ONNX Runtime's own quantizer (for the grid) and an unpacking of the MatMulNBits initializers written here."""

import numpy as np
import pytest

from compressor.quantize import blockwise


def _inputs(k, tokens, draw, seed=1):
    """Correlated inputs whose channels differ in scale by orders of magnitude (real activations do):
    one mixing matrix and one set of channel scales per `seed`, fresh tokens per `draw`."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    scale = np.exp(rng.standard_normal(k))
    return (np.random.default_rng([seed, draw]).standard_normal((tokens, k)) @ mix) * scale


def _unpack(packed, scales, zp, k):
    """[K, N] weight of 4-bit MatMulNBits initializers (low nibble first, zero points two per byte)."""
    n, blocks, _ = packed.shape
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float32)
    z = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    return ((codes - z[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
def test_act_order_lowers_held_out_output_error(grid):
    """(w - dq)^T H (w - dq) summed over outputs, with H from a second draw of tokens: act-order
    beats input order by 25% or more when the input energies vary strongly."""
    k, n = 160, 48
    calib, held = _inputs(k, 2048, draw=0), _inputs(k, 2048, draw=1)
    h, h_held = calib.T @ calib, held.T @ held
    assert np.diagonal(h).max() > 30 * np.diagonal(h).min()

    def error(q, w):
        d = (w - q.dequantize()).astype(np.float64)
        return float(np.einsum("kn,kl,ln->", d, h_held, d))

    for seed in range(3):
        w = np.random.default_rng(10 + seed).standard_normal((k, n)).astype(np.float32)
        plain = error(blockwise.gptq(w, h, 4, 32, grid), w)
        ordered = error(blockwise.gptq(w, h, 4, 32, grid, act_order=True), w)
        assert ordered < 0.75 * plain


def test_act_order_writes_the_original_weights_block_grid():
    """Static groups: every block's scale and zero point are those ORT's quantizer gives the original
    weight, and the written initializers, unpacked here, give back exactly the dequantized weight."""
    k, n = 96, 40  # 3 blocks of 32
    calib = _inputs(k, 1024, draw=0)
    w = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    q = blockwise.gptq(w, calib.T @ calib, 4, 32, "asymmetric", act_order=True)
    ort_rtn = blockwise.rtn(w, 4, 32, "asymmetric")
    np.testing.assert_allclose(q.scales, ort_rtn.scales, rtol=1e-6)
    np.testing.assert_array_equal(q.zero_points, ort_rtn.zero_points)
    packed, scales, zp = blockwise.pack(q)
    np.testing.assert_array_equal(_unpack(packed, scales, zp, k), q.dequantize())
    assert not np.array_equal(q.codes, ort_rtn.codes)  # the error feedback moved codes


def test_act_order_without_correlations_is_rtn():
    """A diagonal H with very different entries orders the rows but has nothing to feed back: the codes
    are round-to-nearest's, in input order (the permutation is undone), with padding and a dead input."""
    k, n = 80, 9  # 80 inputs: the last block is padded
    w = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    d = np.exp(3 * np.random.default_rng(5).standard_normal(k))
    d[7] = 0.0
    w[7] = 0.0  # GPTQ zeroes a dead input's weights; so does this reference
    for grid in ("asymmetric", "symmetric"):
        g = blockwise.gptq(w, np.diag(d), 4, 32, grid, damp=0.0, act_order=True)
        r = blockwise.rtn(w, 4, 32, grid)
        np.testing.assert_array_equal(g.codes.reshape(n, -1)[:, :k], r.codes.reshape(n, -1)[:, :k])
        np.testing.assert_allclose(g.scales, r.scales, rtol=1e-6)


def test_act_order_batch_is_each_weight_alone():
    """Weights of a batch each follow their own Hessian's order."""
    k, n = 64, 12
    ws = [np.random.default_rng(s).standard_normal((k, n)).astype(np.float32) for s in (6, 7)]
    hs = [x.T @ x for x in (_inputs(k, 512, 0, seed=2), _inputs(k, 512, 0, seed=3))]
    batched = blockwise.gptq_many(ws, hs, 4, 32, "asymmetric", act_order=True)
    for q, w, h in zip(batched, ws, hs):
        alone = blockwise.gptq(w, h, 4, 32, "asymmetric", act_order=True)
        np.testing.assert_allclose(q.dequantize(), alone.dequantize(), atol=1e-6)


def test_quantize_onnx_with_act_order_runs_the_unpacked_weight_in_onnx_runtime(tmp_path):
    """Through quantize_onnx: ONNX Runtime's MatMulNBits output is x @ (the initializers unpacked here),
    the grid is ORT's for the original weight, and act-order lowers the held-out error of plain GPTQ."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from compressor.quantize import Hessians, QuantConfig, quantize_onnx

    k, n = 128, 64
    w = np.random.default_rng(8).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    calib, held = _inputs(k, 2048, draw=0), _inputs(k, 256, draw=1).astype(np.float32)
    errors = {}
    for act_order in (False, True):
        dst = tmp_path / f"q{act_order}.onnx"
        quantize_onnx(src, dst, QuantConfig(algorithm="gptq", keep_int8="none", accuracy_level=1,
                                            act_order=act_order), calibration=Hessians({"x": calib.T @ calib}, 2048))
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
        dq = _unpack(inits["w_Q4"], inits["w_scales"], inits["w_zero_points"], k)
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": held})[0]
        np.testing.assert_allclose(y, held @ dq, rtol=1e-4, atol=1e-3 * np.abs(y).max())
        errors[act_order] = np.linalg.norm(y - held @ w)
        if act_order:
            np.testing.assert_allclose(inits["w_scales"], blockwise.rtn(w, 4, 32, "asymmetric").scales, rtol=1e-6)
    assert errors[True] < 0.9 * errors[False]
