"""`--device` picks ONNX Runtime's execution providers explicitly: cpu runs on the CPU even where
onnxruntime-gpu is installed, cuda:N on that GPU (issue 22)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import make_tokenizer, tiny_model

from compressor.errors import CompressorError
from compressor.evaluate import get_backend

ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture
def gpu_build(monkeypatch):
    """ONNX Runtime as onnxruntime-gpu reports itself (CUDA first); returns the providers each session
    was asked for."""
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *(p for p in available if p != CUDA)])
    asked: list = []
    real = ort.InferenceSession

    def session(path, options=None, providers=None, **kwargs):
        asked.append(providers)
        return real(path, options, providers=[p for p in providers if p == CPU or CUDA in available], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="needs onnxruntime-genai")
def test_device_cpu_runs_on_the_cpu_provider_only(tmp_path, gpu_build):
    from compressor.export.genai import run_builder

    run_builder(tiny_model("llama", head_dim=16), make_tokenizer(), tmp_path / "onnx")  # the fast route
    backend = get_backend("onnxruntime", tmp_path / "onnx", device="cpu", threads=1)
    assert gpu_build == [[CPU]]
    assert backend.runner.session.get_providers() == [CPU] and backend.settings()["providers"] == [CPU]
    assert not backend.runner.on_gpu


def test_devices_map_to_providers(gpu_build):
    from compressor.export.runtime import providers_for

    assert providers_for("cpu") == [CPU]
    assert providers_for("cuda") == [(CUDA, {"device_id": 0}), CPU]
    assert providers_for("cuda:1") == [(CUDA, {"device_id": 1}), CPU]
    assert providers_for(None) == providers_for("auto") == [CUDA, CPU]  # CUDA where ONNX Runtime has it
    with pytest.raises(CompressorError, match="unknown device 'tpu'"):
        providers_for("tpu")


def test_cuda_without_onnxruntime_gpu_is_refused(monkeypatch):
    from compressor.export.runtime import providers_for

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(CompressorError, match="onnxruntime-gpu"):
        providers_for("cuda")
    assert providers_for(None) == [CPU]
