"""Graphs over protobuf's 2 GB limit: calibration and quantization go through external data.

A >2 GB model does not fit a test run, so the limit (`protos.PROTOBUF_LIMIT`) is lowered to 1 KiB:
the tiny graph below is then "too large" and must take the same path a 0.5B-parameter fp32 graph
takes. Its Hessians are checked against numpy on the same tokens, independently of ONNX Runtime.
"""

import logging

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from compressor.quantize import QuantConfig, measure_hessians, protos, quantize_onnx

V, D, H = 64, 32, 48


def _token_graph(tmp_path):
    """input_ids -> Gather(emb) -> MatMul(w1) -> Relu -> MatMul(w2) -> logits, weights inline."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    w1 = rng.standard_normal((D, H)).astype(np.float32) / 4
    w2 = rng.standard_normal((H, V)).astype(np.float32) / 4
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])],
        [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w1, "w1"), (w2, "w2"))])
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, emb, w1


def test_hessians_through_external_data_match_numpy(tmp_path, monkeypatch, caplog):
    path, emb, w1 = _token_graph(tmp_path)
    ids = np.random.default_rng(1).integers(0, V, (6, 10))
    monkeypatch.setattr(protos, "PROTOBUF_LIMIT", 1024)
    with caplog.at_level(logging.INFO, logger="compressor.quantize.protos"):
        hess = measure_hessians(path, ids)
    assert "external data" in caplog.text  # the path a >2 GB graph takes was taken
    x = emb[ids].reshape(-1, D).astype(np.float64)
    r = np.maximum(x @ w1.astype(np.float64), 0)
    np.testing.assert_allclose(hess.sums["x"], x.T @ x, rtol=1e-4, atol=1e-4)  # float32 products
    np.testing.assert_allclose(hess.sums["r"], r.T @ r, rtol=1e-4, atol=1e-4)
    assert hess.tokens == ids.size


def test_quantize_with_calibration_over_the_limit_runs(tmp_path, monkeypatch, caplog):
    path, _, _ = _token_graph(tmp_path)
    ids = np.random.default_rng(2).integers(0, V, (4, 12))
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    monkeypatch.setattr(protos, "PROTOBUF_LIMIT", 1024)
    out = tmp_path / "q" / "model.onnx"
    with caplog.at_level(logging.INFO, logger="compressor.quantize.protos"):
        summary = quantize_onnx(path, out, QuantConfig(bits=8, algorithm="mse"), calibration=ids)
    assert "external data" in caplog.text and summary.calibration_tokens == ids.size
    assert (out.parent / "model.onnx.data").is_file()  # the weights are outside the graph proto
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_session_of_a_small_graph_stays_in_memory(tmp_path, caplog):
    path, _, _ = _token_graph(tmp_path)
    model = onnx.load(str(path))
    with caplog.at_level(logging.INFO, logger="compressor.quantize.protos"), protos.ort_session(model) as session:
        assert session.get_outputs()[0].name == "logits"
    assert "external data" not in caplog.text
