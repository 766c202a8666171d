"""Backends: the registry's errors, torch decoding with a cache, runners driven through the contract."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from test_eval_perplexity import NumpyRunner

from compressor.errors import CompressorError, MissingDependencyError
from compressor.evaluate import backend_names, get_backend, perplexity
from compressor.evaluate.backends import RunnerBackend, detect_backend
from compressor.evaluate.latency import DecodeSpec, PrefillSpec, decode_trial, prefill_trial


def test_unknown_backend_lists_the_registered_ones():
    with pytest.raises(CompressorError) as info:
        get_backend("tflite", "anything")
    for name in ("torch", "onnxruntime", "tensorrt"):
        assert name in str(info.value)
    assert set(backend_names()) >= {"torch", "onnxruntime", "tensorrt"}


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_missing_tensorrt_names_the_extra(tmp_path):
    with pytest.raises(MissingDependencyError, match=r"compressor\[tensorrt\]"):
        get_backend("tensorrt", tmp_path)


def test_detect_backend(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert detect_backend(tmp_path) == "onnxruntime"
    assert detect_backend(tmp_path / "x.engine") == "tensorrt"
    assert detect_backend("smollm2-135m") == "torch"


def greedy_without_cache(model, prompt, steps):
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_torch_decode_with_cache_matches_full_recompute_without_warnings(model_type):
    model = tiny_model(model_type)
    backend = get_backend("torch", model)
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecated-kwarg warning
        state = backend.prefill(prompt)
        tokens = [state[1]]
        for _ in range(4):
            state = backend.decode_step(state)
            tokens.append(state[1])
    assert torch.equal(torch.cat(tokens, 1), greedy_without_cache(model, prompt, 5))
    assert backend.settings()["threads"] >= 1 and "torch" in backend.versions()


def test_runner_backend_drives_the_runner_contract():
    model = tiny_model("llama")
    backend = RunnerBackend(NumpyRunner(model), path=Path("."), device="cpu", threads=None)
    backend.vocab_size = 128
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    state = backend.prefill(prompt)
    tokens = [torch.from_numpy(state[1])]
    for _ in range(3):
        state = backend.decode_step(state)  # NumpyRunner asserts mask and positions
        tokens.append(torch.from_numpy(state[1]))
    assert torch.equal(torch.cat(tokens, 1), greedy_without_cache(model, prompt, 4))
    assert len(prefill_trial(backend, PrefillSpec(1, 8))(False)) == 1
    trial = decode_trial(backend, DecodeSpec(1, 8, 3), warmup_tokens=2)
    assert trial(True) == [] and len(trial(False)) == 1  # warm-up decodes, then one timed step per call
    assert all(len(trial(False)) == 1 for _ in range(7))  # wraps around to a fresh prefill


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="needs onnxruntime-genai")
def test_onnxruntime_perplexity_and_decoding_equal_torch(tmp_path):
    """On a builder graph (the route most models take; torch.onnx graphs are checked in tests/export)."""
    from compressor.export.genai import run_builder

    model = tiny_model("llama", head_dim=16)
    run_builder(model, make_tokenizer(), tmp_path / "onnx")
    backend = get_backend("auto", tmp_path / "onnx", threads=1)
    assert backend.name == "onnxruntime" and backend.num_blocks == 4 and backend.vocab_size == 128
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(2))
    expected = perplexity(model, ids, 64, 32)
    got = perplexity(backend, ids, 64, 32, batch_size=2)
    assert got.tokens == expected.tokens
    assert got.nll == pytest.approx(expected.nll, rel=1e-4)
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    state = backend.prefill(prompt)
    tokens = [torch.from_numpy(state[1])]
    for _ in range(3):
        state = backend.decode_step(state)
        tokens.append(torch.from_numpy(state[1]))
    assert torch.equal(torch.cat(tokens, 1), greedy_without_cache(model, prompt, 4))
    assert "onnxruntime" in backend.versions() and backend.settings()["intra_op_threads"] == 1
    assert backend.tokenizer is not None and backend.size_bytes() > 0


def test_bad_devices_are_clear():
    with pytest.raises(CompressorError, match="unknown device"):
        get_backend("torch", tiny_model("llama"), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CompressorError, match="CUDA"):
            get_backend("torch", tiny_model("llama"), device="cuda")


def test_compare_loaded_models():
    from compressor.evaluate import BenchConfig, TimingConfig, run_bench
    from compressor.surgery.edit import copy_without_blocks

    full = tiny_model("llama")
    config = BenchConfig(prefill="1x8", decode="4+2", perplexity=False,
                         timing=TimingConfig(warmup=0, min_runs=2, min_seconds=0.0))
    result = run_bench(full, copy_without_blocks(full, [1, 2]), config=config, labels=("full", "pruned"))
    data = result.to_dict()
    assert (data["model"], data["blocks"]) == ("full", 4)
    assert (data["compare"]["other"]["model"], data["compare"]["other"]["blocks"]) == ("pruned", 2)
    assert data["compare"]["speedup"]["prefill"][0]["p50"] > 0 and data["perplexity"] is None


def test_torch_backend_threads_hold_only_while_it_is_open():
    """`threads` sets torch's process-wide count; it used to stay set after the benchmark ended."""
    from compressor.evaluate import BenchConfig, TimingConfig, run_bench
    from compressor.evaluate.backends import TorchBackend

    before = torch.get_num_threads()
    pinned = 1 if before != 1 else 2
    model = tiny_model("llama")
    with TorchBackend(model, threads=pinned) as backend:
        assert torch.get_num_threads() == pinned and backend.settings()["threads"] == pinned
    assert torch.get_num_threads() == before
    config = BenchConfig(prefill="1x8", decode="none", perplexity=False,
                         timing=TimingConfig(warmup=0, min_runs=1, min_seconds=0.0))
    result = run_bench(model, model, threads=pinned, config=config, labels=("a", "b"))
    assert result.a.settings["threads"] == pinned == result.b.settings["threads"]
    assert torch.get_num_threads() == before
