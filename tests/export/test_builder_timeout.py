"""onnxruntime-genai's builder runs in a child process with a time limit: running out of it is a
BuilderError that says what to do, not an internal error (issue 22); a failing builder is one too."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer, tiny_model

from compressor.export import genai
from compressor.export.run import export_model

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")
pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai: pip install 'compressor[genai]'")


def test_a_builder_that_runs_out_of_time_is_a_builder_error(tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=64, head_dim=16, num_hidden_layers=2)  # a head size it builds
    monkeypatch.setattr(genai, "_BUILDER_TIMEOUT_S", 0.01)  # far less than reading the checkpoint takes
    out = tmp_path / "onnx"
    out.mkdir()
    with pytest.raises(genai.BuilderError, match=r"did not finish within 0.01 s.*--route dynamo") as caught:
        export_model(model, make_tokenizer(), out, route="builder", validate=False)
    assert "\n" not in str(caught.value)


def test_a_failing_builder_is_a_builder_error_with_its_last_line(tmp_path):
    """The builder's own error (here: an execution provider it does not know) reaches the user as one line,
    and its output stays off this process's stdout."""
    log_file = tmp_path / "builder.log"
    code, output = genai._build(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-p", "fp32", "-e", "no-such-ep",
                                 "-c", str(tmp_path / "cache")], log_file)
    assert code not in (0, None) and "no-such-ep" in output and log_file.read_text() == output
