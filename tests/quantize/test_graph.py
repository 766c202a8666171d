"""quantize_onnx on small graphs, run by ONNX Runtime and compared with the fp32 graph and ORT's own quantizer."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from compressor.errors import CompressorError
from compressor.quantize import (
    Hessians,
    QuantConfig,
    blockwise,
    quantize_onnx,
)

K, H, V = 64, 96, 80


def _graph(tmp_path, seed=0, tied=False):
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> logits; with tied=True a Gather also reads w2 transposed."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((K, H)).astype(np.float32) / 8
    w2 = rng.standard_normal((H, V)).astype(np.float32) / 8
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", V])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])]
    if tied:
        nodes += [helper.make_node("Transpose", ["w2"], ["emb"], name="emb_t", perm=[1, 0]),
                  helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed")]
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", H]))
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "fp32.onnx"
    onnx.save(model, str(path))
    return path, w1, w2


def _run(path, **feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _nodes(path):
    m = onnx.load(str(path))
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} | {"op": n.op_type} for n in m.graph.node}


@pytest.mark.parametrize("bits", [4, 8])
def test_single_matmul_output_within_formula_bound(tmp_path, bits):
    path, w1, _w2 = _graph(tmp_path)
    out = tmp_path / "q.onnx"
    quantize_onnx(path, out, QuantConfig(bits=bits, algorithm="rtn", keep_int8="none", accuracy_level=1,
                                         grid="symmetric"))
    x = np.random.default_rng(3).standard_normal((5, K)).astype(np.float32)
    # Compare the first layer alone: cut the quantized graph at h by reading the MatMulNBits output.
    m = onnx.load(str(out))
    m.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    onnx.save(m, str(tmp_path / "cut.onnx"))
    h_q = _run(tmp_path / "cut.onnx", x=x)[1]
    q = blockwise.rtn(w1, bits, 32, True)
    # |x (w - dq)| <= sum_k |x_k| |w_k - dq_k| <= sum_k |x_k| * step_k (one step covers the clipped edge).
    step = np.repeat(np.abs(q.scales).T, 32, axis=0)[:K]
    bound = np.abs(x) @ step
    assert np.all(np.abs(h_q - x @ w1) <= bound + 1e-5)
    assert np.abs(h_q - x @ w1).max() > 0  # it really is quantized


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_matches_onnxruntime_quantizer(tmp_path, bits, symmetric):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    path, _, _ = _graph(tmp_path)
    ours = tmp_path / "ours.onnx"
    grid = "symmetric" if symmetric else "asymmetric"
    quantize_onnx(path, ours, QuantConfig(bits=bits, algorithm="rtn", keep_int8="none", grid=grid))
    theirs = MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, bits=bits, accuracy_level=4))
    theirs.process()
    onnx.save(theirs.model.model, str(tmp_path / "theirs.onnx"))
    x = np.random.default_rng(4).standard_normal((7, K)).astype(np.float32)
    a, b = _run(ours, x=x)[0], _run(tmp_path / "theirs.onnx", x=x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_int8_graph_close_to_fp32(tmp_path):
    path, _, _ = _graph(tmp_path)
    out = tmp_path / "q8.onnx"
    summary = quantize_onnx(path, out, QuantConfig(bits=8, algorithm="rtn"))
    x = np.random.default_rng(5).standard_normal((6, K)).astype(np.float32)
    ref, got = _run(path, x=x)[0], _run(out, x=x)[0]
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert summary.nodes == {"up": 8, "head": 8}
    assert summary.bytes_after < summary.bytes_before / 3


def test_lm_head_kept_int8_in_written_graph(tmp_path):
    path, _, _ = _graph(tmp_path)
    out = tmp_path / "q4.onnx"
    summary = quantize_onnx(path, out, QuantConfig(bits=4, algorithm="rtn", keep_int8="lm_head"))
    nodes = _nodes(out)
    assert nodes["head_Q8"]["op"] == "MatMulNBits" and nodes["head_Q8"]["bits"] == 8
    assert nodes["up_Q4"]["bits"] == 4
    assert summary.int8_nodes == ["head"]
    named = quantize_onnx(path, tmp_path / "named.onnx", QuantConfig(bits=4, algorithm="rtn", keep_int8="up"))
    assert named.nodes == {"up": 8, "head": 4}


def test_tied_weight_kept_float_when_asked(tmp_path):
    path, _, w2 = _graph(tmp_path, tied=True)
    out = tmp_path / "q.onnx"
    summary = quantize_onnx(path, out, QuantConfig(bits=4, algorithm="rtn", embeddings="float"))
    x = np.zeros((1, K), np.float32)
    ids = np.array([3, 7], np.int64)
    np.testing.assert_array_equal(_run(out, x=x, ids=ids)[1], w2.T[ids])
    assert summary.embeddings == {}


def _dequantized(inits, name, bits, rows):
    """[N, K] weight from MatMulNBits initializers, unpacked here (low nibble first), implicit zero point."""
    packed = inits[f"{name}_Q{bits}"]
    if bits == 4:
        codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    else:
        codes = packed
    dq = (codes.astype(np.float32) - 2 ** (bits - 1)) * inits[f"{name}_scales"][..., None]
    return dq.reshape(dq.shape[0], -1)[:, :rows]


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_gathers_the_quantized_head(tmp_path, bits):
    """The embedding rows and the logits both come from the head's integers, dequantized here."""
    path, _, w2 = _graph(tmp_path, tied=True)
    out = tmp_path / "q.onnx"
    summary = quantize_onnx(path, out, QuantConfig(bits=bits, algorithm="rtn", keep_int8="none", grid="symmetric",
                                                   accuracy_level=1))
    assert list(summary.embeddings) == ["embed"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert "w2" not in inits  # no float copy of the table is left
    head, up = _dequantized(inits, "w2", bits, H), _dequantized(inits, "w1", bits, K)  # [V, H], [H, K]
    x = np.random.default_rng(7).standard_normal((3, K)).astype(np.float32)
    ids = np.array([3, 7, 3, 79], np.int64)
    logits, rows = _run(out, x=x, ids=ids)
    np.testing.assert_allclose(rows, head[ids], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logits, np.maximum(x @ up.T, 0) @ head.T, rtol=1e-4, atol=1e-4)
    step = np.abs(inits["w2_scales"]).max()
    assert np.abs(head - w2.T).max() <= step  # and they are a quantization of the table


def test_minmax_grid_reproduces_a_q4_1_weight(tmp_path):
    """A weight built on llama.cpp's Q4_1 grid (codes, a scale and a float minimum per 32 inputs)
    comes back exactly, and so do the graph's outputs."""
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 16, (H, K // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 blocks span their range
    d, m = rng.random((H, K // 32, 1)) / 10 + 0.01, rng.standard_normal((H, K // 32, 1)) / 4
    w = (codes * d + m).reshape(H, K).T.astype(np.float32)  # [K, H]
    q = blockwise.rtn(w, 4, 32, "minmax")
    np.testing.assert_allclose(q.dequantize(), w, atol=1e-6)
    np.testing.assert_array_equal(q.codes, codes)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", H])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "w.onnx"))
    quantize_onnx(tmp_path / "w.onnx", tmp_path / "q.onnx", QuantConfig(algorithm="rtn", accuracy_level=1,
                                                                                keep_int8="none", grid="minmax"))
    assert _nodes(tmp_path / "q.onnx")["mm_Q4"]["bits"] == 4
    x = rng.standard_normal((5, K)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "q.onnx", x=x)[0], x @ w, rtol=1e-4, atol=1e-4)


def test_gptq_beats_rtn_on_calibrated_inputs(tmp_path):
    """GPTQ weights rounding by the inputs the graph really sees; measured on held-out inputs."""
    path, w1, _w2 = _graph(tmp_path)
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((K, K)).astype(np.float32) / 4
    calib = (rng.standard_normal((256, K)).astype(np.float32) @ mix)
    held = (rng.standard_normal((64, K)).astype(np.float32) @ mix)
    from compressor.quantize import graph as qgraph

    # Feed the Hessians directly: this graph has no token input, so the windows path is not used.
    hess = {"x": calib.astype(np.float64).T @ calib, "r": None}
    r = np.maximum(calib @ w1, 0)
    hess["r"] = r.astype(np.float64).T @ r
    errs = {}
    for algo in ("rtn", "gptq"):
        out = tmp_path / f"{algo}.onnx"
        qgraph.quantize_onnx(path, out, QuantConfig(bits=4, algorithm=algo, keep_int8="none"),
                             calibration=None if algo == "rtn" else Hessians(hess, 256))
        errs[algo] = np.linalg.norm(_run(out, x=held)[0] - _run(path, x=held)[0])
    assert errs["gptq"] < 0.9 * errs["rtn"]


@pytest.mark.parametrize("config, words", [
    (QuantConfig(bits=3), "bits must be 4 or 8"),
    (QuantConfig(block_size=20), "power of two"),
    (QuantConfig(algorithm="awq9"), "algorithm must be one of"),
    (QuantConfig(accuracy_level=7), "accuracy_level"),
    (QuantConfig(damp=0.0), "damp must be"),
    (QuantConfig(act_order="yes"), "act_order must be"),
    (QuantConfig(algorithm="gptq"), "needs calibration"),
    (QuantConfig(keep_int8="nosuch"), "not weight MatMuls"),
])
def test_bad_configs_refused_and_nothing_written(tmp_path, config, words):
    path, _, _ = _graph(tmp_path)
    out = tmp_path / "out" / "q.onnx"
    with pytest.raises(CompressorError, match=words):
        quantize_onnx(path, out, config)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_source_refused(tmp_path):
    with pytest.raises(CompressorError, match="not an ONNX file"):
        quantize_onnx(tmp_path / "nope.onnx", tmp_path / "q.onnx", QuantConfig(algorithm="rtn"))


def test_unnamed_nodes_are_rewritten_one_by_one(tmp_path):
    path, _, _ = _graph(tmp_path, tied=True)
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(path))
    out = tmp_path / "q.onnx"
    summary = quantize_onnx(path, out, QuantConfig(bits=8, algorithm="rtn"))
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "GatherBlockQuantized" in ops and "Relu" in ops
    assert "Transpose" not in ops and len(summary.embeddings) == 1
    x = np.random.default_rng(9).standard_normal((2, K)).astype(np.float32)
    ref, got = _run(path, x=x, ids=np.array([1, 2]))[0], _run(out, x=x, ids=np.array([1, 2]))[0]
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
