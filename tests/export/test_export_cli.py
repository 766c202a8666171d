"""`compress export` end to end: bad input fails fast with one line and exit 2, a tiny model exports."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import make_tokenizer, run_cli, tiny_model

from compressor.cli import COMMANDS

pytestmark = pytest.mark.skipif(
    not any(name == "export" for *_, name in COMMANDS),
    reason="`export` is not registered in compressor.cli.COMMANDS yet",
)


def compress(*args):
    """`compress export ARGS` through the real entry point, in this process (see conftest.run_cli)."""
    return run_cli("export", *args)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def one_block_dir(tmp_path):
    path = tmp_path / "one-block-llama"
    tiny_model("llama", num_hidden_layers=1).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    result = compress(tmp_path / "notes", "--out", tmp_path / "out")
    assert_one_line_error(result, "not a model directory")
    assert not (tmp_path / "out").exists()


def test_unsupported_precision_fails_before_loading(tmp_path, one_block_dir):
    result = compress(one_block_dir, "--out", tmp_path / "out", "--precision", "int3")
    assert_one_line_error(result, "int3", "fp32, fp16, bf16, int8, int4")
    assert not (tmp_path / "out").exists()


def test_unknown_format(tmp_path, one_block_dir):
    assert_one_line_error(compress(one_block_dir, "--out", tmp_path / "out", "--format", "tflite"),
                          "tflite", "onnx or tensorrt")


def test_unwritable_output(tmp_path, one_block_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = compress(one_block_dir, "--out", blocker / "out")
    assert_one_line_error(result, "cannot write")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_format_without_tensorrt_names_the_extra(tmp_path, one_block_dir):
    result = compress(one_block_dir, "--out", tmp_path / "out", "--format", "tensorrt")
    assert_one_line_error(result, "pip install 'compressor[tensorrt]'", "docs.nvidia.com")
    assert not (tmp_path / "out").exists()


def test_export_tiny_model_json_then_refuse_to_overwrite(tmp_path, one_block_dir):
    out = tmp_path / "onnx"
    result = compress(one_block_dir, "--out", out, "--optimize", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "onnx" and data["num_layers"] == 1 and data["dtype"] == "float32"
    assert data["route"] == "dynamo" and "multiple of 16" in data["route_reason"]  # head size 8: fallback
    assert data["validation"]["passed"] and data["validation"]["optimized"]["passed"]
    assert data["validation"]["greedy"]["matched"] == 32
    for name in ("model.onnx", "model_optimized.onnx", "config.json", "tokenizer.json", "validation.json",
                 "export.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers

    again = compress(one_block_dir, "--out", out)
    assert_one_line_error(again, "already exists", "--overwrite")


@pytest.mark.parametrize("args, fragment", [
    (["--format", "tensorrt", "--precision", "int4"], "int4"),
    (["--precision", "fp8"], "fp8 is a TensorRT precision"),
    (["--precision", "int4", "--block-size", "20"], "block_size must be a power of two"),
])
def test_precisions_that_cannot_run_exit_2_before_loading(tmp_path, one_block_dir, args, fragment):
    assert_one_line_error(compress(one_block_dir, "--out", tmp_path / "out", *args), fragment)
    assert not (tmp_path / "out").exists()


def test_quantized_export_failing_validation_leaves_nothing(tmp_path, tiny_dir):
    """Through the builder route (head size 16), the one most users get."""
    out = tmp_path / "int4"
    result = compress(tiny_dir, "--out", out, "--precision", "int4", "--max-kl", "0", "--min-top1", "0.5")
    assert result.returncode == 2, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]  # after the progress lines
    assert last.startswith("error:") and "outside its bounds" in last and "--allow-mismatch" in last, last
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    kept = compress(tiny_dir, "--out", out, "--precision", "int4", "--max-kl", "0", "--allow-mismatch", "--json")
    assert kept.returncode == 0, kept.stderr
    data = json.loads(kept.stdout)
    assert data["precision"] == "int4" and not data["validation"]["passed"] and (out / "model.onnx").is_file()
