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
