"""Calibration text: every accepted form, every refused one, and deterministic windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from compressor.data import load_texts, make_windows, other_source
from compressor.errors import DataError

WORDS = "the of and to a in is that for it as with was on be by this are or from at an "


def test_the_bundled_texts_are_prose_of_two_sources():
    """The default: 80 Wikipedia articles, one document each; the other source: Python's documentation,
    its code samples dropped; each is the other's "other source"."""
    texts = load_texts(None)
    assert len(texts) == 80 and sum(map(len, texts)) > 2_000_000
    assert all(t.startswith("= ") and t.splitlines()[0].endswith(" =") for t in texts)
    name, docs = other_source(None)
    assert name == "Python documentation" and len(docs) > 50 and sum(map(len, docs)) > 100_000
    assert not any(line.startswith(" ") for t in docs for line in t.splitlines())
    assert other_source("mine.txt") == ("bundled English", texts)


def test_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second text")
    assert load_texts(tmp_path / "a.txt") == ["first text"]
    assert load_texts(tmp_path) == ["first text", "second text"]
    lines = [json.dumps({"body": "one"}), "", json.dumps({"body": "two"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    assert load_texts(tmp_path / "d.jsonl", field="body") == ["one", "two"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"  \n", "empty"),
    ("bin.txt", b"\x00\x01\x02binary", "binary"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "UTF-8"),
    ("d.jsonl", b'{"body": "x"}\n', "no field 'text'.*--field"),
    ("bad.jsonl", b'{"text": "x"}\nnot json\n', "line 2 is not JSON"),
])
def test_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_texts(tmp_path / name)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no .txt files"):
        load_texts(tmp_path)


def test_windows_are_deterministic_and_disjoint():
    tok = make_tokenizer()
    texts = [WORDS * 20, WORDS * 10]
    a = make_windows(tok, texts, 6, 16, seed=1)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, make_windows(tok, texts, 6, 16, seed=1))
    assert not torch.equal(a, make_windows(tok, texts, 6, 16, seed=2))
    assert len({tuple(w.tolist()[:3]) for w in a}) > 1


def test_window_errors():
    tok = make_tokenizer()
    with pytest.raises(DataError, match="--samples must be at least 1"):
        make_windows(tok, [WORDS], 0, 8, 0)
    with pytest.raises(DataError, match="fewer than one window"):
        make_windows(tok, ["the of and"], 1, 64, 0)
    with pytest.raises(DataError, match="only 2 windows of 10 tokens"):
        make_windows(tok, [WORDS], 5, 10, 0)  # 22 words + EOS = 23 tokens
    # at_most takes what there is: both windows of the 23-token stream, the same as asking for 2.
    assert torch.equal(make_windows(tok, [WORDS], 5, 10, 0, at_most=True), make_windows(tok, [WORDS], 2, 10, 0))
    with pytest.raises(DataError, match="fewer than one window"):
        make_windows(tok, ["the of and"], 1, 64, 0, at_most=True)


def test_token_stream_is_kept_and_equals_tokenizing_each_document(monkeypatch):
    """The stream of a long text is tokenized once and kept in the process: every call returns the
    tokens that encoding each document by hand gives (in pieces of 65,536 characters, as documented), and
    a caller that edits its copy leaves the kept one alone. Other text or another tokenizer: another key."""
    from compressor import data

    monkeypatch.setattr(data, "_STREAMS", {})
    tokenizer, texts = make_tokenizer(), load_texts(None)[:20]
    by_hand = []
    for text in texts:
        for start in range(0, len(text), 1 << 16):
            by_hand += tokenizer(text[start:start + (1 << 16)], add_special_tokens=False)["input_ids"]
        by_hand.append(tokenizer.eos_token_id)
    first = data.token_stream(tokenizer, texts)
    assert first.tolist() == by_hand and len(data._STREAMS) == 1
    first[:] = 0
    assert data.token_stream(tokenizer, texts).tolist() == by_hand and len(data._STREAMS) == 1
    other = load_texts(None)[20:40]
    assert data._stream_key(tokenizer, other) != data._stream_key(tokenizer, texts)
    changed = make_tokenizer()
    changed.backend_tokenizer.add_tokens(["quantum"])
    assert data._stream_key(changed, texts) != data._stream_key(tokenizer, texts)
    assert data._stream_key(tokenizer, ["short text"]) is None  # not kept: it costs nothing to tokenize
