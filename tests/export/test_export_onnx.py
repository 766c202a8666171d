"""ONNX export of tiny models, checked against PyTorch through ONNX Runtime.

Each model is traced once per test run (`exported`, through conftest's `shared_folder`): tracing is
the slow part, so the tests that look at an export share it, whichever pytest-xdist worker runs them.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_tokenizer, shared_folder, tiny_model

from compressor.adapters import ADAPTERS
from compressor.errors import CompressorError
from compressor.export.onnx import (
    ONNX_FILE,
    OPTIMIZED_FILE,
    export_onnx,
    input_names,
    output_names,
)
from compressor.export.runtime import OrtCausalLM
from compressor.export.validate import (
    VALIDATION_FILE,
    ExportMismatchError,
    torch_greedy,
    validate_onnx,
)
from compressor.surgery.edit import drop_blocks_

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'compressor[onnx]'")

# Exported on every run; the rest of TINY_CONFIGS runs with -m slow.
CORE_ARCHS = ["gpt2", "llama", "qwen2", "gemma3_text", "opt"]
OTHER_ARCHS = sorted(set(TINY_CONFIGS) - set(CORE_ARCHS))
# Architectures that do not export yet, with the reason (none known at present).
KNOWN_FAILURES: dict[str, str] = {}


def small(arch: str, blocks: int = 2, seed: int = 0):
    """A tiny model with `blocks` decoder blocks: fewer blocks trace faster."""
    return tiny_model(arch, seed=seed, **{ADAPTERS[arch].layer_count[0]: blocks})


_EXPORTS: dict = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(arch, blocks=2, **export_kwargs) -> (model, folder), traced once per arguments."""

    def get(arch: str, blocks: int = 2, **kwargs):
        key = (arch, blocks, tuple(sorted(kwargs.items())))
        if key not in _EXPORTS:
            model = small(arch, blocks)
            name = "-".join(["onnx", arch, str(blocks), *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
            folder = shared_folder(name, lambda out: export_onnx(model, make_tokenizer(), out, **kwargs),
                                   tmp_path_factory.mktemp(f"onnx-{arch}") / "export")
            _EXPORTS[key] = (model, folder)
        return _EXPORTS[key]

    return get


def _export_and_validate(exported, arch):
    model, folder = exported(arch)
    report = validate_onnx(model, folder, tokenizer=make_tokenizer())  # raises on a mismatch
    assert report.passed and report.logits_max_abs <= 1e-4
    assert report.greedy.matched == 32
    assert {c.past for c in report.cases} >= {0, 8} and {c.batch for c in report.cases} >= {1, 2, 3}
    saved = json.loads((folder / VALIDATION_FILE).read_text())
    assert saved["passed"] and saved["greedy"]["matched"] == 32


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_export_validates_against_pytorch(exported, arch):
    _export_and_validate(exported, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[a], strict=True)) if a in KNOWN_FAILURES else a
    for a in OTHER_ARCHS
])
def test_export_other_architectures(exported, arch):
    _export_and_validate(exported, arch)


def test_folder_describes_itself_with_optimum_names(exported):
    import onnx

    _, folder = exported("llama")
    for name in ("config.json", "generation_config.json", "tokenizer.json", ONNX_FILE):
        assert (folder / name).is_file(), name
    graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
    assert [i.name for i in graph.input] == input_names(2)
    assert [o.name for o in graph.output] == output_names(2)
    assert input_names(1) == ["input_ids", "attention_mask", "position_ids",
                              "past_key_values.0.key", "past_key_values.0.value"]
    dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str), dims  # batch and past are dynamic


def test_runner_contract_and_empty_past(exported):
    model, folder = exported("llama")
    runner = OrtCausalLM(folder, threads=1)
    assert runner.num_layers == 2 and runner.config.model_type == "llama"
    past = runner.empty_past(3)
    assert len(past) == 4 and all(p.shape == (3, 2, 0, 8) for p in past)
    ids = np.array([[5, 6, 7, 8]] * 3, dtype=np.int64)
    logits, present = runner.forward(ids, np.ones_like(ids), np.tile(np.arange(4), (3, 1)), past)
    assert logits.shape == (3, 4, 128) and present[0].shape == (3, 2, 4, 8)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # One more token on top of that cache, defaults for mask and positions.
    step, _ = runner.forward(ids[:, :1], past=present)
    with torch.no_grad():
        full = model(torch.from_numpy(np.concatenate([ids, ids[:, :1]], 1))).logits.numpy()
    np.testing.assert_allclose(step[:, -1], full[:, -1], atol=1e-4)


def test_greedy_batch_with_left_padding_matches_single_rows(exported):
    model, folder = exported("qwen2")
    runner = OrtCausalLM(folder, threads=1)
    long, short = [9, 10, 11, 12, 13], [20, 21, 22]
    batch = np.array([long, [0, 0, *short]], dtype=np.int64)
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]], dtype=np.int64)
    got = runner.generate_greedy(batch, 12, attention_mask=mask)
    assert got.shape == (2, 17)
    for row, prompt in enumerate((long, short)):
        expected, _ = torch_greedy(model, torch.tensor([prompt]), 12)
        assert got[row, 5:].tolist() == expected


def test_pruned_model_exports_with_renumbered_cache_and_validates(tmp_path):
    import onnx

    model = small("llama", blocks=4, seed=1)
    drop_blocks_(model, [1, 2])
    result = export_onnx(model, make_tokenizer(), tmp_path, optimize=True)
    assert result.num_layers == 2 and result.optimized == tmp_path / OPTIMIZED_FILE
    names = [i.name for i in onnx.load(str(tmp_path / ONNX_FILE), load_external_data=False).graph.input]
    assert names[3:] == ["past_key_values.0.key", "past_key_values.0.value",
                         "past_key_values.1.key", "past_key_values.1.value"]
    report = validate_onnx(model, tmp_path, tokenizer=make_tokenizer())
    assert report.passed and report.optimized is not None and report.optimized.passed
    assert json.loads((tmp_path / "config.json").read_text())["compressor"]["removed"] == [1, 2]
    assert OrtCausalLM(tmp_path).path.name == OPTIMIZED_FILE  # the folder runs its optimised graph


def test_mismatch_is_an_error_with_numbers_unless_allowed(exported):
    model, folder = exported("gpt2")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ExportMismatchError, match=r"max \|logits diff\| [0-9.e+-]+.*--allow-mismatch"):
        validate_onnx(other, folder, greedy_tokens=4)
    report = validate_onnx(other, folder, greedy_tokens=4, allow_mismatch=True)
    assert not report.passed and report.logits_max_abs > 1e-3
    assert json.loads((folder / VALIDATION_FILE).read_text())["passed"] is False


def test_float16_export_validates_at_float16_tolerance(exported):
    model, folder = exported("llama", dtype="float16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    runner = OrtCausalLM(folder / ONNX_FILE)
    assert runner.dtype == np.float16
    report = validate_onnx(model, folder, greedy_tokens=8)
    assert report.dtype == "float16" and report.passed and report.tolerance["abs"] > 1e-3


@pytest.mark.parametrize("bad", ["int8", "bfloat16"])
def test_unsupported_dtype_is_refused(bad, tmp_path):
    with pytest.raises(CompressorError, match="float32 or float16"):
        export_onnx(small("llama"), None, tmp_path, dtype=bad)
