"""onnxruntime-genai's builder runs in a child process with a time limit: running out of it is a
BuilderError that says what to do, not an internal error (issue 22); a failing builder is one too."""

from __future__ import annotations

from pathlib import Path

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


def test_the_builder_child_runs_in_the_callers_directory(tmp_path, monkeypatch):
    """The child is forked from a server started earlier, elsewhere: a relative output folder is still the
    caller's."""
    genai._build(["-e", "no-such-ep"], tmp_path / "first.log")  # the fork server is running from here on
    monkeypatch.chdir(tmp_path)
    genai.run_builder(tiny_model("llama", head_dim=16, num_hidden_layers=1), make_tokenizer(), Path("relative"))
    assert (tmp_path / "relative" / "model.onnx").is_file() and (tmp_path / "relative" / "genai_config.json").is_file()


SCRIPT = """
from pathlib import Path
from compressor.export.genai import _build
print("top level ran")  # no __main__ guard: a child that re-ran this script would print it again
code, output = _build(["-i", ".", "-o", "out", "-p", "fp32", "-e", "no-such-ep"], Path({log!r}))
assert code == 2 and "no-such-ep" in output, (code, output[-2000:])  # the builder's own argument error
"""


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """multiprocessing re-runs the caller's main script in a forked-server child unless told otherwise; a
    user's script that calls compressor at top level must not run twice."""
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(log=str(tmp_path / "builder.log")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top level ran") == 1
