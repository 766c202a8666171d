"""The builder route, precisions, and onnxruntime-genai's own generator on every kind of export folder.

References: PyTorch's greedy tokens through transformers' own cache (`torch_greedy`), the unmodified
PyTorch model's logits (validation), and a client we did not write (onnxruntime-genai).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, run_cli, tiny_model

from compressor.errors import CompressorError
from compressor.export.genai import GENAI_CONFIG, builder_refusal, genai_generate
from compressor.export.run import SUMMARY_FILE, choose_route, export_model, quant_options
from compressor.export.runtime import OrtCausalLM
from compressor.export.validate import torch_greedy
from compressor.surgery.edit import drop_blocks_

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")
pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'compressor[genai]'")

# ORT's CPU GroupQueryAttention needs head sizes that are multiples of 16
WIDE = {"hidden_size": 64, "head_dim": 16, "num_hidden_layers": 3}
BUILDER_CORE = ["llama", "qwen3", "gemma"]  # plain, layer_types (qwen3), Gemma's scaled embeddings
BUILDER_OTHER = ["mistral", "qwen2", "granite"]


def wide(arch: str, seed: int = 0, **overrides):
    return tiny_model(arch, seed=seed, **{**WIDE, **overrides})


def export(model, tmp_path, name="out", **kwargs):
    out = tmp_path / name
    out.mkdir()
    summary = export_model(model, make_tokenizer(), out, **kwargs)
    return summary, out


_SHARED: dict = {}


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """shared(name, **export kwargs) -> (model, summary, folder): wide("llama") exported once per session
    for the tests that only read the folder (an export is the slow part of each of them)."""

    def get(name: str, **kwargs):
        if name not in _SHARED:
            model = wide("llama")
            folder = tmp_path_factory.mktemp(f"genai-{name}")
            _SHARED[name] = (model, export_model(model, make_tokenizer(), folder, **kwargs), folder)
        return _SHARED[name]

    return get


def assert_genai_greedy_equals_pytorch(model, folder, new_tokens=24):
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ref, _ = torch_greedy(model, prompt, new_tokens)
    got = genai_generate(folder, prompt[0].tolist(), new_tokens)
    eos = model.config.eos_token_id
    if eos in ref:  # genai stops at EOS, PyTorch's reference loop does not
        ref = ref[: ref.index(eos) + 1]
    assert got == ref


def _builder_export_matches(model, summary, folder):
    assert summary.route == "builder", summary.route_reason
    assert summary.validation["passed"] and summary.validation["greedy"]["matched"] == 32
    assert summary.validation["logits_max_abs"] <= 1e-4
    assert {c["batch"] for c in summary.validation["cases"]} >= {1, 2}
    assert "GroupQueryAttention" in " ".join(summary.validation["notes"])  # the skipped cases say why
    saved = json.loads((folder / SUMMARY_FILE).read_text())
    assert saved["route"] == "builder" and saved["precision"] == "fp32"
    assert_genai_greedy_equals_pytorch(model, folder)


@pytest.mark.parametrize("arch", BUILDER_CORE)
def test_builder_route_equals_pytorch_and_genai_generates_its_tokens(arch, tmp_path, shared):
    if arch == "llama":
        _builder_export_matches(*shared("builder"))
    else:
        model = wide(arch)
        _builder_export_matches(model, *export(model, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("arch", BUILDER_OTHER)
def test_builder_route_other_families(arch, tmp_path):
    model = wide(arch)
    _builder_export_matches(model, *export(model, tmp_path))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dynamo_folder_runs_in_genai_with_pytorch_tokens(arch, tmp_path, shared):
    if arch == "llama":
        model, summary, folder = shared("dynamo", route="dynamo")
    else:
        model = tiny_model(arch, n_layer=2)
        summary, folder = export(model, tmp_path, route="dynamo")
    assert summary.route == "dynamo"
    config = json.loads((folder / GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert_genai_greedy_equals_pytorch(model, folder)


def test_auto_falls_back_to_dynamo_and_says_why(tmp_path):
    narrow = tiny_model("llama", num_hidden_layers=2)  # head size 8
    assert "multiple of 16" in builder_refusal(narrow)
    assert choose_route(tiny_model("gpt2"), "auto", "fp32")[0] == "dynamo"
    summary, folder = export(narrow, tmp_path)
    assert summary.route == "dynamo" and "multiple of 16" in summary.route_reason
    assert json.loads((folder / SUMMARY_FILE).read_text())["route_reason"] == summary.route_reason
    with pytest.raises(CompressorError, match="--route builder cannot export"):
        choose_route(narrow, "builder", "fp32")
    assert "tokenizer" in choose_route(wide("llama"), "auto", "fp32", has_tokenizer=False)[1]
    assert "sliding-window" in builder_refusal(tiny_model("mistral", **WIDE, sliding_window=16))
    assert "does not export 'gemma2'" in builder_refusal(tiny_model("gemma2", **WIDE))


def test_pruned_model_exports_through_the_builder(tmp_path):
    model = wide("qwen3", num_hidden_layers=4)
    reference = wide("qwen3", num_hidden_layers=4)
    drop_blocks_(model, [1, 2])
    summary, folder = export(model, tmp_path)
    assert summary.route == "builder" and summary.num_layers == 2 and summary.record["removed"] == [1, 2]
    assert OrtCausalLM(folder).num_layers == 2
    assert summary.validation["passed"]
    ids = torch.randint(3, 128, (1, 9))
    logits, _ = OrtCausalLM(folder).forward(ids.numpy())
    with torch.no_grad():  # the pruned export is not the full model (the check above could not pass by accident)
        assert not np.allclose(logits, reference(ids).logits.numpy(), atol=1e-3)
    assert_genai_greedy_equals_pytorch(model, folder)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_keep_their_bounds_and_run_in_genai(precision, shared):
    # A random tiny model's next-token distributions are near uniform, so its top-1 is decided by near ties
    # and flips with any rounding (0.375 in one CI run at KL 1e-3): hold it to KL and perplexity instead,
    # with a KL bound far tighter than the default that a broken quantization would exceed.
    quant, bounds = quant_options(precision, min_top1=0.0, max_kl=0.02)
    _, summary, folder = shared(precision, precision=precision, quant=quant, bounds=bounds)
    report = summary.validation
    assert report["kind"] == "quantized" and report["passed"]
    assert report["perplexity_increase"] <= report["bounds"]["max_ppl_increase"]
    assert report["top1_agreement"] >= report["bounds"]["min_top1"]
    counts = summary.quantization["counts"]
    assert counts.get("8" if precision == "int8" else "4", 0) > 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    assert not (folder / ".float-graph").exists()
    tokens = genai_generate(folder, [5, 6, 7, 8], 8)
    assert 1 <= len(tokens) <= 8 and all(0 <= t < 128 for t in tokens)


def test_quantizing_an_earlier_float_graph_writes_what_a_fresh_export_writes(shared, tmp_path, caplog):
    """export_model(float_graph=): the int8 export quantizes a copy of the fp32 builder folder's graph, and
    its files equal those of an int8 export that built its own graph; the fp32 folder is left as it was."""
    import onnx
    from onnx import numpy_helper

    quant, bounds = quant_options("int8", min_top1=0.0, max_kl=0.02)
    model, _, fresh = shared("int8", precision="int8", quant=quant, bounds=bounds)
    source = shared("builder")[2]
    before = sorted(p.name for p in source.iterdir())
    with caplog.at_level(logging.INFO, logger="compressor"):
        summary, reused = export(model, tmp_path, precision="int8", quant=quant, validate=False, float_graph=source)
    assert f"quantizing a copy of the fp32 graph in {source}" in caplog.text
    assert "building the fp32 graph" not in caplog.text and "tracing" not in caplog.text  # none built
    assert sorted(p.name for p in source.iterdir()) == before
    assert summary.quantization["counts"] == json.loads((fresh / SUMMARY_FILE).read_text())["quantization"]["counts"]

    def files(folder):
        return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("validation")}

    assert files(reused) == files(fresh)

    def weights(folder):
        graph = onnx.load(str(folder / "model.onnx")).graph
        return {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    mine, theirs = weights(reused), weights(fresh)
    assert mine.keys() == theirs.keys()
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_quantized_export_failing_its_bounds_is_an_error_with_the_numbers(tmp_path):
    from compressor.export.quality import QualityError

    model = wide("llama")
    _, bounds = quant_options("int4", max_kl=0.0)  # any change of the logits exceeds it
    with pytest.raises(QualityError, match=r"perplexity .* top-1 agreement .* mean KL"):
        export(model, tmp_path, precision="int4", bounds=bounds, quant=None)
    kept, _ = export(model, tmp_path, name="kept", precision="int4", bounds=bounds, allow_mismatch=True)
    assert not kept.validation["passed"] and kept.warnings


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "bf16"}, "bf16 graphs need ONNX Runtime's CUDA provider"),
    ({"precision": "fp8"}, "fp8 is a TensorRT precision"),
    ({"precision": "int3"}, "unknown precision"),
    ({"route": "fast"}, "unknown export route"),
])
def test_precisions_the_cpu_cannot_run_are_refused(kwargs, message, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and kwargs.get("precision") == "bf16":
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(CompressorError, match=message):
        export_model(wide("llama"), None, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_compress_bench_runs_builder_and_quantized_folders(shared):
    """`compress bench` on a builder fp32 folder scores PyTorch's perplexity; int4 and dynamo folders run too."""
    from compressor.evaluate.perplexity import load_eval_tokens, perplexity

    quant, bounds = quant_options("int4", min_top1=0.0, max_kl=0.02)
    model = shared("builder")[0]
    folders = {"builder": shared("builder")[2],
               "int4": shared("int4", precision="int4", quant=quant, bounds=bounds)[2],
               "dynamo": shared("dynamo", route="dynamo")[2]}
    ids = load_eval_tokens(make_tokenizer(), None, max_tokens=300)
    reference = perplexity(model, ids, max_length=64, stride=32).perplexity
    for name, folder in folders.items():
        done = run_cli(
            "bench", folder, "--backend", "onnxruntime", "--prefill", "2x16",
            "--decode", "2x8+4", "--max-eval-tokens", "300", "--max-length", "64", "--stride", "32",
            "--min-runs", "1", "--min-seconds", "0", "--warmup", "0", "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        data = json.loads(done.stdout)
        assert data["blocks"] == 3 and data["prefill"][0]["p50_ms"] > 0 and data["decode"][0]["p50_ms"] > 0
        got = data["perplexity"]["perplexity"]
        if name == "int4":
            assert got == pytest.approx(reference, rel=0.25)
        else:
            assert got == pytest.approx(reference, rel=1e-4), name
