"""SmolLM2-135M with blocks removed: exports through both routes, matches PyTorch (-m smollm2)."""

from __future__ import annotations

import dataclasses

import pytest

from compressor.blocks import parse_blocks
from compressor.export.onnx import export_onnx
from compressor.export.validate import validate_onnx
from compressor.info import count_parameters
from compressor.surgery.edit import drop_blocks_

pytestmark = pytest.mark.smollm2
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'compressor[onnx]'")


def test_smollm2_pruned_dynamo_export_validates_and_stores_each_weight_once(tmp_path, smollm2):
    """The dynamo route on real weights, 3 of 30 blocks kept (the export cost follows the depth; what is
    checked does not): PyTorch's logits and greedy tokens, a renumbered cache, and a file that holds the
    parameters once in fp32 (the tied embedding is not stored twice: that would add 28M x 4 bytes)."""
    model, tokenizer = smollm2
    drop_blocks_(model, parse_blocks("2-28", 30))
    result = export_onnx(model, tokenizer, tmp_path)
    report = validate_onnx(model, tmp_path, tokenizer=tokenizer, threads=2)
    assert report.passed, report.summary()
    assert report.greedy.matched == 32 and report.greedy.first_mismatch is None
    assert result.num_layers == 3
    assert result.size_bytes == pytest.approx(4 * count_parameters(model), rel=0.01)


def test_smollm2_pruned_int8_export_validates_and_genai_generates(tmp_path, smollm2):
    """Through the default route (the builder for SmolLM2), 27 of 30 blocks, int8 weights.

    Three of the most linear blocks go (13-15): a model that still works, so top-1 agreement means something
    (removing 20-25 gives perplexity ~1,850 on the bundled text, where agreement between two near-random
    distributions says nothing about the quantization)."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'compressor[genai]'")
    from compressor.export.genai import genai_generate
    from compressor.export.quality import DEFAULT_BOUNDS
    from compressor.export.run import export_model

    model, tokenizer = smollm2
    drop_blocks_(model, parse_blocks("13-15", 30))
    out = tmp_path / "int8"
    out.mkdir()
    # validated on 1,024 tokens, not the default 2,048: the same bounds, half the PyTorch and ORT windows
    bounds = dataclasses.replace(DEFAULT_BOUNDS["int8"], tokens=1024)
    summary = export_model(model, tokenizer, out, precision="int8", bounds=bounds, threads=2)
    assert summary.route == "builder" and summary.num_layers == 27
    report = summary.validation
    assert report["passed"] and report["tokens"] == 1024 and report["perplexity_increase"] <= 0.02, report["summary"]
    assert report["top1_agreement"] >= 0.9, report["summary"]
    prompt = tokenizer("The history of the city begins")["input_ids"]
    tokens = genai_generate(out, prompt, 16)
    assert len(tokens) >= 1 and tokenizer.decode(tokens).strip()
