"""quantize_onnx on a real causal-LM graph: ONNX Runtime's model builder run on a tiny random Llama."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import make_tokenizer, shared_folder, tiny_model

from compressor.quantize import QuantConfig, measure_hessians, quantize_onnx
from compressor.quantize.calibration import _feeds, head_size


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_model("llama", hidden_size=64, head_dim=16, intermediate_size=128)  # GQA: head_size % 16 == 0

    def build(root):
        model.save_pretrained(root / "hf")
        make_tokenizer().save_pretrained(root / "hf")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o",
                        str(root / "fp32"), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")],
                       check=True, capture_output=True)

    root = shared_folder("builder-llama-64", build, tmp_path_factory.mktemp("builder") / "built")
    return model, root / "fp32" / "model.onnx"


def _logits(path, ids):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    head = head_size(onnx.load(str(path), load_external_data=False).graph)
    return np.concatenate([s.run(["logits"], _feeds(s, row[None], head))[0] for row in ids])


def test_hessian_of_first_block_matches_pytorch(built):
    model, path = built
    ids = torch.randint(4, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    hess = measure_hessians(path, ids, skip_first=1)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[:, 1:].reshape(-1, 64).double()
    name = next(n for n in hess.sums if "layers.0/input_layernorm" in n)
    np.testing.assert_allclose(hess.sums[name], (x.T @ x).numpy(), rtol=1e-4, atol=1e-6)
    assert hess.tokens == 3 * 23


def test_gptq_closer_to_fp32_than_rtn_on_fresh_tokens(built, tmp_path):
    _, path = built
    gen = torch.Generator().manual_seed(1)
    calib, fresh = torch.randint(4, 128, (16, 32), generator=gen), torch.randint(4, 128, (4, 32), generator=gen)
    ref = _logits(path, fresh.numpy())
    errs = {}
    for algo in ("rtn", "gptq"):
        out = tmp_path / algo / "model.onnx"
        summary = quantize_onnx(path, out, QuantConfig(bits=4, algorithm=algo, keep_int8="none"), calibration=calib)
        assert summary.algorithm == algo and set(summary.nodes.values()) == {4}
        errs[algo] = np.abs(_logits(out, fresh.numpy()) - ref).mean()
    assert errs["gptq"] < errs["rtn"]


def test_auto_keeps_the_lm_head_int8_and_quantizes_the_embedding(built, tmp_path):
    """This tiny Llama is untied: its table gets its own 8-bit copy (tied tables: test_graph.py)."""
    _, path = built
    summary = quantize_onnx(path, tmp_path / "q" / "model.onnx", QuantConfig(), calibration=torch.randint(4, 128, (2, 16)))
    assert summary.algorithm == "gptq"
    assert "/lm_head/MatMul" in summary.int8_nodes
    assert list(summary.embeddings) == ["/model/embed_tokens/Gather"]
    written = onnx.load(str(tmp_path / "q" / "model.onnx"))
    nbits = [n for n in written.graph.node if n.op_type == "MatMulNBits"]
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in nbits}
    assert attrs["/lm_head/MatMul_Q8"]["bits"] == 8
    promoted = [n for n, a in attrs.items() if a["bits"] == 8 and n != "/lm_head/MatMul_Q8"]
    share = sum(attrs[n]["K"] * attrs[n]["N"] for n in promoted)
    assert 0 < share <= 0.25 * sum(a["K"] * a["N"] for n, a in attrs.items() if n != "/lm_head/MatMul_Q8")
    gather = next(n for n in written.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in written.graph.node if n.output[0] == gather.input[0])
    inits = {t.name: t for t in written.graph.initializer}
    assert inits[reshape.input[0]].data_type == onnx.TensorProto.UINT8
    assert "model.embed_tokens.weight" not in inits  # no float table left


def test_int4_folder_runs_in_onnxruntime_genai(built, tmp_path):
    """genai's own generator on the quantized folder picks the token a plain ORT run of it ranks first."""
    import shutil

    from compressor.export.genai import genai_generate

    _, path = built
    folder = tmp_path / "int4"
    shutil.copytree(path.parent, folder, ignore=shutil.ignore_patterns("model.onnx*"))
    quantize_onnx(path, folder / "model.onnx", QuantConfig(), calibration=torch.randint(4, 128, (2, 16)))
    prompt = [5, 17, 33, 9, 60, 2 + 40]
    first = int(_logits(folder / "model.onnx", np.array([prompt]))[0, -1].argmax())
    tokens = genai_generate(folder, prompt, 4)
    assert tokens and tokens[0] == first


def test_awq_folds_into_norms_and_up_and_leaves_the_logits_unchanged(built, tmp_path):
    """On the builder's graph: scales go into the norms before qkv and gate/up and into up before
    down (not through attention, nor into the final norm before the tied lm_head). The folded float
    graph computes the logits of the original, and its Hessians are the ones measured on it again."""
    from compressor.quantize import awq
    from compressor.quantize.graph import _weight_matmuls
    from compressor.quantize.protos import load_model, save_model

    _, path = built
    ids = torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    hessians = dict(measure_hessians(path, ids).sums)
    model = load_model(path)
    matmuls = _weight_matmuls(model.graph)
    folded = awq.fold_scales_(model.graph, matmuls, hessians, 32, "asymmetric")
    layers = len([x for x in hessians if x.endswith("mlp/Mul/output_0")])
    kinds = ("input_layernorm/output_0", "post_attention_layernorm/output_0", "mlp/Mul/output_0")
    assert set(folded) <= {f"/model/layers.{i}/{x}" for i in range(layers) for x in kinds}  # alpha 0 stays out
    assert all(any(x.endswith(kind) for x in folded) for kind in kinds)
    out = tmp_path / "folded" / "model.onnx"
    out.parent.mkdir()
    save_model(model, out)
    fresh = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(3)).numpy()
    ref = _logits(path, fresh)
    np.testing.assert_allclose(_logits(out, fresh), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    again = measure_hessians(out, ids).sums
    for name in folded:
        np.testing.assert_allclose(hessians[name], again[name], rtol=1e-3, atol=1e-5 * np.abs(again[name]).max())
