"""Perplexity window arithmetic against a straightforward loop written here, on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compressor.errors import DataError
from compressor.evaluate.perplexity import load_eval_tokens, perplexity, plan_windows


def reference_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's recipe, written out: labels -100 on context, per-token NLL from the logits."""
    total, count, prev_end = 0.0, 0, 0
    n = len(ids)
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[begin:end]
        labels = window.clone()
        labels[: len(window) - (end - prev_end)] = -100
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0].double()
        for t in range(1, len(window)):
            if labels[t] == -100:
                continue
            row = logits[t - 1]
            total += float(torch.logsumexp(row, 0) - row[labels[t]])
            count += 1
        prev_end = end
        if end == n:
            break
    return total / count, count


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize(("n", "max_length", "stride"), [
    (20, 64, 32),  # shorter than one window
    (64, 64, 32),  # exactly one window
    (65, 64, 64),  # one window and one token
    (200, 64, 32),  # many overlapping windows
    (200, 64, 17),  # stride that does not divide anything
    (200, 64, 64),  # disjoint windows
    (2, 64, 1),  # the smallest text
])
def test_perplexity_matches_straightforward_loop(model, n, max_length, stride):
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n))
    expected_nll, expected_count = reference_nll(model, ids, max_length, stride)
    result = perplexity(model, ids, max_length, stride)
    assert result.tokens == expected_count
    if stride < max_length:  # overlapping windows score every token but the first
        assert result.tokens == n - 1
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert result.windows == len(plan_windows(n, max_length, stride))
    batched = perplexity(model, ids, max_length, stride, batch_size=3)
    assert batched.nll == pytest.approx(result.nll, rel=1e-5)


def test_windows_score_every_token_once():
    for n in (2, 3, 63, 64, 65, 300):
        for max_length, stride in ((64, 32), (64, 64), (16, 5), (2, 1), (16, 16)):
            windows = plan_windows(n, max_length, stride)
            scored = [t for w in windows for t in range(w.first_scored, w.end)]
            # overlapping windows: every token but the first; disjoint windows (stride == max_length)
            # cannot score the first token of each window, which nothing in that window predicts
            unscored = {0} if stride < max_length else {w.begin for w in windows}
            assert scored == [t for t in range(n) if t not in unscored]
            assert all(w.end - w.begin <= max_length and w.first_scored > w.begin for w in windows)
    assert [(w.begin, w.end) for w in plan_windows(64, 64, 32)] == [(0, 64)]
    assert [(w.begin, w.end, w.first_scored) for w in plan_windows(100, 64, 32)] == [(0, 64, 1), (32, 96, 64),
                                                                                    (64, 100, 96)]


def test_bad_window_settings_and_too_little_text():
    with pytest.raises(DataError, match="stride"):
        plan_windows(100, 64, 65)
    with pytest.raises(DataError, match="max-length"):
        plan_windows(100, 1, 1)
    for n in (0, 1):
        with pytest.raises(DataError, match="at least 2"):
            plan_windows(n, 64, 32)


class NumpyRunner:
    """An export runner stand-in (numpy in and out, the OrtCausalLM contract) around a torch model."""

    def __init__(self, model):
        self.model, self.num_layers = model, model.config.num_hidden_layers

    def empty_past(self, batch):
        return []

    def forward(self, input_ids, attention_mask, position_ids, past):
        from compressor.util.kvcache import cache_kwarg, new_cache

        assert input_ids.dtype == attention_mask.dtype == position_ids.dtype == np.int64
        cache = past[0] if past else new_cache(self.model.config)
        seen = cache.get_seq_length()
        assert attention_mask.shape == (input_ids.shape[0], seen + input_ids.shape[1])
        assert (position_ids == np.arange(seen, seen + input_ids.shape[1])).all()
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
                             use_cache=True, **{cache_kwarg(self.model): cache})
        return out.logits.numpy(), [cache]


def test_runner_gives_the_same_perplexity(model):
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(1))
    expected = perplexity(model, ids, 64, 32)
    got = perplexity(NumpyRunner(model), ids, 64, 32, batch_size=2)
    assert got.nll == pytest.approx(expected.nll, rel=1e-6)


def test_load_eval_tokens_reads_txt_and_jsonl(tmp_path):
    tokenizer = make_tokenizer()
    (tmp_path / "a.txt").write_text("the value of the function is a list")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ("the value of the", "function is a list")))
    txt = load_eval_tokens(tokenizer, tmp_path / "a.txt")
    assert txt.dtype == torch.long and txt.dim() == 1
    assert txt.tolist() == tokenizer("the value of the function is a list")["input_ids"]
    jsonl = load_eval_tokens(tokenizer, tmp_path / "b.jsonl", field="body")
    assert jsonl.tolist() == tokenizer("the value of the\n\nfunction is a list")["input_ids"]
    assert load_eval_tokens(tokenizer, tmp_path / "a.txt", max_tokens=3).tolist() == txt[:3].tolist()
    capped = load_eval_tokens(tokenizer, None, max_tokens=100)  # tokenizes only a prefix of the text
    assert capped.tolist() == load_eval_tokens(tokenizer, None)[:100].tolist()


def test_eval_text_without_tokens_is_a_data_error(tmp_path):
    tokenizer = make_tokenizer()
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(DataError):
        load_eval_tokens(tokenizer, tmp_path / "empty.txt")
    (tmp_path / "a.txt").write_text("the value")
    with pytest.raises(DataError, match="no tokens"):
        load_eval_tokens(tokenizer, tmp_path / "a.txt", max_tokens=0)


@pytest.mark.parametrize("first", [1, 3])
def test_next_token_nll_is_cross_entropy_of_each_position_on_the_next_token(first):
    """The one loss definition against torch's cross-entropy, position by position, with every reduction,
    and its gradient (healing trains through it)."""
    import torch.nn.functional as F

    from compressor.evaluate.loss import next_token_nll

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 7))
    reference = torch.stack([F.cross_entropy(logits[b, t - 1], ids[b, t]) for b in range(2) for t in range(first, 7)])
    mine = next_token_nll(logits, ids, first)
    assert mine.shape == reference.shape and torch.allclose(mine, reference)
    assert torch.allclose(next_token_nll(logits, ids, first, "sum"), reference.sum())
    assert torch.allclose(next_token_nll(logits, ids, first, "mean"), reference.mean())
    (grad,) = torch.autograd.grad(next_token_nll(logits, ids, first, "mean"), logits)
    (expected,) = torch.autograd.grad(reference.mean(), logits)
    assert torch.allclose(grad, expected)
    with pytest.raises(ValueError):
        next_token_nll(logits, ids, first, "max")
