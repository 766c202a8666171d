"""Losses for healing: distillation on next-token distributions, hidden states at cut points, and the
cosine regularizer from "Your Transformer is Secretly Linear" (arXiv 2405.12250).

All functions take float logits/hidden states and compute in float32, whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from compressor.adapters import get_adapter
from compressor.evaluate.loss import next_token_nll
from compressor.util.hooks import hidden_of

_NEG = -1e4  # a finite "log 0": keeps 0 * log(0) terms at 0 with finite gradients


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on the full next-token distributions at temperature T, times T^2.

    Averaged over every position of every window (Hinton et al.'s T^2 keeps gradient scale
    independent of T).
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    return kl.mean() * t * t


def topk_kd_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL between the teacher's top-k distribution plus a tail bucket and the student's, times T^2.

    `teacher_logprobs` [..., k] are log-probabilities of the teacher at temperature T (the cache stores
    them at the training temperature), `teacher_indices` [..., k] their token ids. The distribution
    compared has k + 1 outcomes: the k tokens, and "any other token" carrying the rest of the mass
    (1 - sum of the k probabilities) for the teacher and the student alike. Unlike renormalizing over
    the top k, the tail bucket still penalizes a student that puts mass on tokens the teacher rules
    out. With k = vocabulary size the tail is empty and this equals `kd_loss` exactly.
    """
    t = float(temperature)
    s_all = F.log_softmax(student_logits.float() / t, dim=-1)
    idx = teacher_indices.long()
    s_top = s_all.gather(-1, idx)
    p_top = teacher_logprobs.float()
    kl = (p_top.exp() * (p_top - s_top)).sum(-1)
    if idx.shape[-1] < s_all.shape[-1]:
        p_tail = (1.0 - p_top.exp().sum(-1)).clamp_min(0.0)
        s_tail = s_all.scatter(-1, idx, float("-inf")).logsumexp(-1).clamp_min(_NEG)
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * s_tail
    return kl.mean() * t * t


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the T-1 predicted positions of each window."""
    return next_token_nll(logits, input_ids, reduction="mean")


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-token relative squared error ||h_s - h_t||^2 / ||h_t||^2, averaged over tokens.

    Relative rather than plain MSE: from the middle of most LLMs on, the first token of a window
    carries a hidden state 100x the norm of the others ("massive activations"), and a plain MSE
    would fit that one token and ignore the rest. Here every token weighs the same.
    """
    s, t = student.float(), teacher.float()
    err = (s - t).pow(2).sum(-1)
    return (err / t.pow(2).sum(-1).clamp_min(1e-6)).mean()


def consecutive_cosine(hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks l and tokens of cos(h_l, h_{l+1}), the hidden states entering and leaving block l.

    `hidden_states` is h_0 (the input of block 0, i.e. the token embeddings) followed by the output of
    every block, each [batch, tokens, width].
    """
    if len(hidden_states) < 2:
        raise ValueError("need the hidden states before and after at least one block")
    sims = [F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).mean()
            for a, b in itertools.pairwise(hidden_states)]
    return torch.stack(sims).mean()


class LinearityRegularizer(torch.nn.Module):
    """A cosine term between consecutive hidden states, as a loss module (after arXiv 2405.12250).

    The paper adds a cosine-similarity term between the embeddings of consecutive layers to the
    pretraining loss and reports lower linearity and better TinyStories/SuperGLUE results. This
    module computes exactly::

        R = weight * (1 / L) * sum_{l=0}^{L-1} mean_{b,t} cos(h_l[b, t], h_{l+1}[b, t])

    where h_0 is the input of block 0 (the token embeddings), h_{l+1} is the output of block l
    (the residual stream, before the final norm), L the number of blocks, and the mean runs over
    every token of every window in the batch. With weight > 0 it penalizes consecutive states that
    point the same way, i.e. blocks that barely turn the residual stream, which is what makes a
    block's map close to linear. A negative weight pulls consecutive states together instead
    (weight * mean(cos) = |weight| * mean(1 - cos) + const). Keep a positive weight small (about
    0.05): a large one is met by flipping the stream's sign from block to block (cos -> -1), which
    is no less linear and costs perplexity (examples/cosine_regularizer.py shows both).

    Use it with `capture_hidden_states(model)`::

        reg = LinearityRegularizer(0.05)
        with capture_hidden_states(model) as states:
            out = model(input_ids=x, labels=x)
        loss = out.loss + reg(states)
    """

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.weight * consecutive_cosine(hidden_states)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


@contextlib.contextmanager
def capture_block_outputs(model: torch.nn.Module, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of some blocks during forward passes: yields {block index: output}.

    The dict is refilled on every forward; the hooks are removed on exit, whatever happens.
    """
    blocks = get_adapter(model).blocks_of(model)
    captured: dict[int, torch.Tensor] = {}

    def save(i):
        def hook(module, args, output):
            captured[i] = hidden_of(output)
        return hook

    handles = []
    try:
        handles += [blocks[i].register_forward_hook(save(i)) for i in sorted(set(indices))]
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that, after each forward pass, holds h_0 (block 0's input) then every block's output.

    Blocks run in order, so the list is filled in order; it restarts at every forward.
    """
    blocks = get_adapter(model).blocks_of(model)
    states: list[torch.Tensor] = []

    def start(module, args, kwargs):
        states.clear()
        states.append(args[0] if args else kwargs["hidden_states"])

    def append(module, args, output):
        states.append(hidden_of(output))

    handles = [blocks[0].register_forward_pre_hook(start, with_kwargs=True)]
    try:
        handles += [block.register_forward_hook(append) for block in blocks]
        yield states
    finally:
        for h in handles:
            h.remove()
