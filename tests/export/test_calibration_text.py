"""int4 calibrates on the user's --data text and is validated on its held-out end, never on tokens
calibration read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer, run_cli, tiny_model

from compressor.data import token_stream
from compressor.export.quality import HELD_OUT, split_text

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")


def _document(words: int, seed: int) -> str:
    vocab = ["the", "of", "and", "value", "class", "object", "python", "list", "string", "module", "data", "code"]
    picks = torch.randint(len(vocab), (words,), generator=torch.Generator().manual_seed(seed))
    return " ".join(vocab[i] for i in picks.tolist())


def test_split_text_holds_out_the_end(tmp_path):
    path = tmp_path / "data.txt"
    text = _document(5000, 0)
    path.write_text(text)
    (kept,), held = split_text(path)
    assert held and text.endswith(held) and text.startswith(kept)
    assert len(kept) + len(held) <= len(text) and len(held) >= HELD_OUT * len(text)


def test_int4_export_calibrates_on_data_and_validates_on_its_held_out_end(tmp_path):
    model_dir = tmp_path / "llama"
    tiny_model("llama", hidden_size=64, head_dim=16, num_hidden_layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    small = tmp_path / "small.txt"
    small.write_text(_document(3000, 2))  # too few tokens for 64 windows, or for validation on its end
    done = run_cli("export", model_dir, "--out", tmp_path / "int4", "--precision", "int4", "--data", small,
                   "--allow-mismatch", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    (kept,), held = split_text(small)
    windows = len(token_stream(make_tokenizer(), [kept])) // 256
    assert out["quantization"]["calibration_tokens"] == windows * 256 < 64 * 256  # the --data text, kept part
    notes = " ".join(out["validation"]["notes"])
    assert f"has {len(token_stream(make_tokenizer(), [held]))} tokens" in notes  # its end was tried, and said so


def test_validation_reads_the_given_held_out_text():
    from compressor.export.quality import quality_tokens

    text = _document(4000, 3)
    ids, notes = quality_tokens(None, make_tokenizer(), 2000, text)
    assert notes == [] and torch.equal(ids, token_stream(make_tokenizer(), [text])[:2000])


def test_eval_text_is_what_the_quantized_export_is_scored_on(tmp_path):
    """--eval replaces the held-out end as the quality gate's text: the gate's PyTorch reference is the
    perplexity of the --eval text's first tokens, not of the held-out end's; a missing --eval is one line,
    exit 2, before any model is loaded, and leaves nothing."""
    from compressor.evaluate.perplexity import perplexity
    from compressor.loading import load_model

    model_dir = tmp_path / "llama"
    tiny_model("llama", hidden_size=64, head_dim=16, num_hidden_layers=2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["module value list"] * 1500))  # a text unlike the bundled English
    done = run_cli("export", model_dir, "--out", tmp_path / "int8", "--precision", "int8", "--eval", other,
                   "--allow-mismatch", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    validation = json.loads(done.stdout)["validation"]
    model, tokenizer = load_model(str(model_dir))
    ids = token_stream(tokenizer, [other.read_text()])
    window = min(512, model.config.max_position_embeddings)  # the gate's windows: the context, at most 512
    on_eval = perplexity(model, ids[:validation["tokens"]], max_length=window, stride=window // 2).perplexity
    held = token_stream(tokenizer, [split_text(None)[1]])
    on_held = perplexity(model, held[:validation["tokens"]], max_length=window, stride=window // 2).perplexity
    assert validation["perplexity_reference"] == pytest.approx(on_eval, rel=1e-5)
    assert abs(on_eval / on_held - 1) > 0.01  # the two texts tell apart
    assert validation["notes"] == []

    missing = run_cli("export", model_dir, "--out", tmp_path / "nope", "--precision", "int8", "--eval",
                      tmp_path / "absent.txt")
    assert missing.returncode == 2 and "absent.txt does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "nope").exists()
