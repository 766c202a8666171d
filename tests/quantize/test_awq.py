"""AWQ scales folded into a norm and an up projection: the float graph is unchanged, the Hessians
follow the fold, and the scales lower the rounding error on held-out inputs."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from compressor.quantize import QuantConfig, awq, blockwise, quantize_onnx
from compressor.quantize.graph import _weight_matmuls

K, F = 64, 96


def _channel_scales(k, seed=7):
    """Input channels whose sizes differ by up to ~50x, as in real hidden states."""
    return np.exp(np.random.default_rng(seed).normal(0, 1.2, k))


def _mlp(tmp_path, tied=False):
    """x -> LayerNorm(gamma, beta) -> gate, up -> silu(gate) * up -> down -> y (a SwiGLU block);
    tied=True: a Gather also reads the down weight (a shared table)."""
    rng = np.random.default_rng(0)
    gamma = _channel_scales(K).astype(np.float32)
    beta = rng.standard_normal(K).astype(np.float32) / 4
    wg, wu = (rng.standard_normal((K, F)).astype(np.float32) / 8 for _ in range(2))
    wd = rng.standard_normal((F, K)).astype(np.float32) / 8
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "wg"], ["g"], name="gate"),
        helper.make_node("MatMul", ["n", "wu"], ["u"], name="up"),
        helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
        helper.make_node("Mul", ["g", "sg"], ["a"], name="silu"),
        helper.make_node("Mul", ["a", "u"], ["m"], name="mul"),
        helper.make_node("MatMul", ["m", "wd"], ["y"], name="down"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])]
    if tied:
        nodes.append(helper.make_node("Gather", ["wd", "ids"], ["e"], name="embed"))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    inits = [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (beta, "beta"), (wg, "wg"), (wu, "wu"),
                                                         (wd, "wd"))]
    model = helper.make_model(helper.make_graph(nodes, "mlp", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    return path


def _y(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def _hessians(model, x):
    """X^T X of each MatMul input, computed here from the graph's own intermediate tensors."""
    names = sorted({n.input[0] for n in _weight_matmuls(model.graph).values()})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    outs = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, {"x": x})
    return {n: o.astype(np.float64).T @ o.astype(np.float64) for n, o in zip(names, outs, strict=True)}


def _fold(model, hessians):
    """AWQ on every MatMul as a 4-bit one, block 32, ORT's asymmetric grid."""
    matmuls = _weight_matmuls(model.graph)
    return awq.fold_scales_(model.graph, matmuls, hessians, 32, "asymmetric")


def test_folded_graph_computes_the_same_and_its_hessians_are_the_transformed_ones(tmp_path):
    model = onnx.load(str(_mlp(tmp_path)))
    x = np.random.default_rng(1).standard_normal((256, K)).astype(np.float32)
    before = _hessians(model, x)
    hessians = dict(before)
    folded = _fold(model, hessians)
    assert set(folded) == {"n", "m"} and all(a > 0 for a in folded.values())  # the norm and the up projection
    reference = onnx.load(str(tmp_path / "mlp.onnx"))
    np.testing.assert_allclose(_y(model, x), _y(reference, x), rtol=1e-4, atol=1e-5)
    after = _hessians(model, x)  # measured on the folded graph
    for name in before:
        np.testing.assert_allclose(hessians[name], after[name], rtol=1e-3, atol=1e-6 * np.abs(after[name]).max())
    assert not np.allclose(after["n"], before["n"])  # the fold really moved something


def test_scales_lower_held_out_rounding_error():
    """On inputs with uneven channels the searched alpha beats s = 1 (plain rounding) on fresh tokens
    by the direct output error x (W - S^-1 Q(S W))."""
    rng = np.random.default_rng(2)
    k, n = 128, 64
    sizes = _channel_scales(k)
    calib, fresh = (rng.standard_normal((t, k)) * sizes for t in (1024, 1024))
    w = rng.standard_normal((k, n)).astype(np.float32)
    alpha, s = awq.search(w, calib.T @ calib, 4, 32, "asymmetric")

    def error(scale):
        dq = blockwise.rtn(w * scale[:, None].astype(np.float32), 4, 32, "asymmetric").dequantize() / scale[:, None]
        return np.linalg.norm(fresh @ (w - dq)) / np.linalg.norm(fresh @ w)

    assert alpha > 0
    np.testing.assert_allclose(s, sizes ** alpha / np.sqrt((sizes ** alpha).max() * (sizes ** alpha).min()), rtol=0.2)
    assert error(s) < 0.8 * error(np.ones(k))


def test_shared_weights_and_other_readers_are_left_alone(tmp_path):
    model = onnx.load(str(_mlp(tmp_path, tied=True)))
    x = np.random.default_rng(1).standard_normal((64, K)).astype(np.float32)
    (tmp_path / "untied").mkdir()
    hessians = _hessians(onnx.load(str(_mlp(tmp_path / "untied"))), x)  # the same MatMul inputs
    folded = _fold(model, hessians)
    assert set(folded) == {"n"}  # down's weight is also the Gather's table: no scales for m


def test_quantize_onnx_with_awq_stays_close_to_fp32(tmp_path):
    """The whole path: AWQ then GPTQ, written and run by ONNX Runtime, against the float graph on fresh inputs."""
    path = _mlp(tmp_path)
    rng = np.random.default_rng(3)
    calib, fresh = (rng.standard_normal((t, K)).astype(np.float32) for t in (512, 256))
    from compressor.quantize import Hessians

    h = Hessians(_hessians(onnx.load(str(path)), calib), 512)
    ref = _y(onnx.load(str(path)), fresh)
    errors = {}
    for flag in (False, True):
        out = tmp_path / f"awq-{flag}.onnx"
        config = QuantConfig(algorithm="gptq", keep_int8="none", accuracy_level=1, awq=flag, int8_fraction=0)
        quantize_onnx(path, out, config, calibration=h)
        errors[flag] = np.linalg.norm(_y(onnx.load(str(out)), fresh) - ref) / np.linalg.norm(ref)
    assert errors[True] < 0.1 and errors[True] <= 1.05 * errors[False]
