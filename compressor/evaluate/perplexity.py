"""Perplexity with strided sliding windows, the Hugging Face convention, on any backend.

Windows of `max_length` tokens start every `stride` tokens. In each window only the tokens not
scored by an earlier window count (the rest are context, label -100 in Hugging Face terms), and
a window's first token is never scored because nothing predicts it. With overlapping windows
(stride < max_length) every token but the first of the text is scored exactly once. The NLL is
the exact average over scored tokens: the sum of per-token NLLs divided by their number (not a
mean of window means).

The same function scores a torch model, a compressor Backend, or an ONNX Runtime / TensorRT
runner from `compressor.export`, so one text gives one number on every backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.errors import DataError
from compressor.evaluate.loss import next_token_nll
from compressor.util.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    max_length: int
    stride: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; tokens [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


def plan_windows(n_tokens: int, max_length: int = 512, stride: int = 256) -> list[Window]:
    """The windows Hugging Face's strided perplexity recipe evaluates, in order."""
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens (got {max_length})")
    if not 1 <= stride <= max_length:
        raise DataError(f"--stride must be between 1 and --max-length ({max_length}); got {stride}")
    if n_tokens < 2:
        raise DataError(
            f"the evaluation text has {n_tokens} token(s): perplexity needs at least 2; "
            "pass a longer --eval file"
        )
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    model_or_runner,
    token_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of a 1-D LongTensor of token ids under a torch model, Backend or export runner."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).cpu()
    windows = plan_windows(token_ids.numel(), max_length, stride)
    logits_fn = logits_function(model_or_runner)
    total, scored = 0.0, 0
    batches = _batches(windows, max(1, batch_size))
    for batch in track(batches, len(batches), "perplexity"):
        ids = torch.stack([token_ids[w.begin:w.end] for w in batch])
        logits = logits_fn(ids)
        for row, w in enumerate(batch):
            nll = window_nll(logits[row], ids[row].to(logits.device), w.first_scored - w.begin)
            total += nll
            scored += w.end - w.first_scored
    mean = total / scored
    log.info("perplexity %.4f over %d tokens in %d windows", math.exp(mean), scored, len(windows))
    return PerplexityResult(math.exp(mean), mean, scored, max_length, stride, len(windows))


def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: int) -> float:
    """Sum of NLLs of ids[first:] given logits [T, V] of one window (summed in float64)."""
    return float(next_token_nll(logits, ids, first).double().sum())


def logits_function(model_or_runner):
    """A callable ids [B, T] (LongTensor) -> logits [B, T, V] for a model, Backend or runner."""
    if isinstance(model_or_runner, torch.nn.Module):
        model = model_or_runner
        device = next(model.parameters()).device

        @torch.inference_mode()
        def torch_logits(ids):
            return model(input_ids=ids.to(device), use_cache=False).logits

        return torch_logits
    if hasattr(model_or_runner, "empty_past") and hasattr(model_or_runner, "forward"):
        return lambda ids: torch.from_numpy(np.asarray(runner_logits(model_or_runner, ids.numpy())))
    if hasattr(model_or_runner, "logits"):
        return model_or_runner.logits
    raise TypeError(f"cannot score with a {type(model_or_runner).__name__}: pass a torch model or a runner")


def runner_logits(runner, ids: np.ndarray) -> np.ndarray:
    """Logits of a whole window from an export runner, starting from an empty cache."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    batch, length = ids.shape
    mask = np.ones((batch, length), dtype=np.int64)
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    logits, _ = runner.forward(ids, mask, positions, runner.empty_past(batch))
    return logits


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length grouped into batches (only the last window is shorter)."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])
    return batches


# --- evaluation text ------------------------------------------------------------------------

def load_eval_tokens(tokenizer, path: Path | str | None = None, field: str = "text",
                     max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D LongTensor) of an evaluation text (.txt, .jsonl, a directory of .txt, or None
    for the bundled text).

    Documents are joined with a blank line ("\\n\\n") and tokenized once with the tokenizer's
    defaults (special tokens included), as in Hugging Face's perplexity recipe; `max_tokens`
    keeps the first tokens of the result.
    """
    from compressor.data import load_texts

    texts = load_texts(Path(path) if path is not None else None, field=field)
    text = "\n\n".join(t for t in texts if t.strip())
    ids = _tokenize(tokenizer, text, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) == 0:
        where = path if path is not None else "the bundled text"
        raise DataError(f"{where} has no tokens to evaluate: pass a non-empty --eval file")
    return torch.tensor(ids, dtype=torch.long)


def _tokenize(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    # A long file capped at max_tokens: tokenize a generous prefix only (16 characters per token);
    # the margin keeps the boundary, where a cut could split a word, out of the kept tokens.
    budget = 16 * max_tokens if max_tokens else None
    if budget is not None and len(text) > budget:
        ids = tokenizer(text[:budget], verbose=False)["input_ids"]
        if len(ids) >= max_tokens + 16:
            return list(ids)
    return list(tokenizer(text, verbose=False)["input_ids"]) if text else []


