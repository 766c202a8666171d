"""TensorRT: profiles and errors everywhere; engines only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compressor.errors import CompressorError, MissingDependencyError
from compressor.export.tensorrt import INSTALL_NOTES, TrtProfile, require_cuda, require_tensorrt

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA = torch.cuda.is_available()


def test_profile_parse_and_shapes():
    profile = TrtProfile.parse("1:2:8", "1:64:256", "0:128:512")
    assert profile.batch == (1, 2, 8) and profile.past == (0, 128, 512)
    low, opt, high = profile.shapes("attention_mask", (-1, -1))
    assert (low, opt, high) == ((1, 1), (2, 192), (8, 768))
    assert profile.shapes("past_key_values.3.value", (-1, 2, -1, 64)) == (
        (1, 2, 0, 64), (2, 2, 128, 64), (8, 2, 512, 64))
    assert profile.accepts(4, 1, 300) and not profile.accepts(9, 1, 0) and not profile.accepts(1, 300, 0)


@pytest.mark.parametrize(("args", "message"), [
    (("8:1:1", None, None), "batch 8:1:1"),
    ((None, "0:1:4", None), "seq 0:1:4"),
    ((None, None, "a:b:c"), "MIN:OPT:MAX"),
    ((None, None, "1:2"), "past 1:2"),
])
def test_profile_errors_say_what_is_wrong(args, message):
    with pytest.raises(CompressorError, match=message):
        TrtProfile.parse(*args)


def test_missing_tensorrt_names_the_extra_and_nvidia_notes(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if it were not installed
    with pytest.raises(MissingDependencyError) as info:
        require_tensorrt()
    assert "pip install 'compressor[tensorrt]'" in str(info.value) and INSTALL_NOTES in str(info.value)


@pytest.mark.skipif(HAVE_CUDA, reason="a CUDA GPU is present")
def test_no_gpu_is_a_clear_error():
    with pytest.raises(CompressorError, match="needs an NVIDIA GPU"):
        require_cuda("building a TensorRT engine")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and HAVE_CUDA), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engine_builds_runs_and_validates(tmp_path, dtype):
    pytest.importorskip("onnxscript")
    from compressor.export.onnx import export_onnx
    from compressor.export.tensorrt import TrtCausalLM, build_engine
    from compressor.export.validate import validate_runner

    model = tiny_model("llama", num_hidden_layers=2)
    exported = export_onnx(model, make_tokenizer(), tmp_path, dtype=dtype)
    info = build_engine(exported.path, profile=TrtProfile.parse("1:2:4", "1:8:64", "0:16:128"))
    sidecar = json.loads((tmp_path / "model.engine.json").read_text())
    assert sidecar["profile"]["past"] == [0, 16, 128] and sidecar["tensorrt"] and sidecar["gpu"]
    assert sidecar["onnx_sha256"] == info.onnx_sha256 and sidecar["dtype"] == dtype

    runner = TrtCausalLM(tmp_path)
    assert runner.num_layers == 2 and all(p.shape == (2, 2, 0, 8) for p in runner.empty_past(2))
    tokens = runner.generate_greedy(np.array([[5, 6, 7]]), 8)
    assert tokens.shape == (1, 11)
    report = validate_runner(model, runner, dtype, make_tokenizer(), greedy_tokens=32)
    assert report.passed, report.summary()
