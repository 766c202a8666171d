"""onnxruntime-genai's builder runs in a subprocess with a time limit: running out of it is a
BuilderError that says what to do, not an internal error (issue 22)."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer, tiny_model

from compressor.export import genai
from compressor.export.run import export_model

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")
pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'compressor[genai]'")


def test_a_builder_that_runs_out_of_time_is_a_builder_error(tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=64, head_dim=16, num_hidden_layers=2)  # a head size it builds
    monkeypatch.setattr(genai, "_BUILDER_TIMEOUT_S", 0.2)  # far less than the builder's Python start-up
    out = tmp_path / "onnx"
    out.mkdir()
    with pytest.raises(genai.BuilderError, match=r"did not finish within 0.2 s.*--route dynamo") as caught:
        export_model(model, make_tokenizer(), out, route="builder", validate=False)
    assert "\n" not in str(caught.value)
