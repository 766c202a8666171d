"""Next-token loss: the one definition every score in compressor uses.

Position t - 1 predicts token t. Perplexity (`compressor.evaluate.perplexity`), the selection
scorer (`compressor.select.scoring`), healing's language-model loss and held-out perplexity all call
`next_token_nll`, so a loss measured while planning, one minimized while healing and one reported
are the same quantity. Logits are upcast to float32 first: half-precision log-softmax over a
vocabulary of 50k loses the small differences between candidate plans.
"""

from __future__ import annotations

import torch


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, first: int = 1, reduction: str = "none") -> torch.Tensor:
    """NLL (nats) of ids[..., first:] given logits [..., T, V] of the same windows.

    reduction "none": one value per scored token, flattened over the leading dimensions
    (shape [prod(...) * (T - first)]); "sum" or "mean": over all of them (as F.cross_entropy).
    """
    scored = logits[..., first - 1:-1, :].float()
    targets = ids[..., first:].to(logits.device)
    # log-sum-exp minus the target's logit: F.cross_entropy's result, without first copying the sliced
    # logits into one contiguous [tokens, vocabulary] block (a third faster on SmolLM2's 49k vocabulary)
    nll = (torch.logsumexp(scored, -1) - scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).flatten()
    if reduction == "none":
        return nll
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be none, sum or mean, not {reduction!r}")
    return nll.sum() if reduction == "sum" else nll.mean()


def real_targets(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat bool [B * (T - 1)]: the predictions whose context token and target are both real (not padding)."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).flatten().bool()
