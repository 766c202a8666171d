"""Streaming statistics: forward hooks on every decoder block, float64 sums, constant memory.

Each hook sees its block's input h_l and output h_{l+1} and adds, for the real tokens of the
batch (the attention mask, when given, selects them), h_{l+1}'h_{l+1}, h_l'h_{l+1} and the sums
into float64 accumulators on the device where the block runs (blocks may sit on different devices
under an accelerate device_map). The input Gram of block l is the output Gram of block l - 1, so
each block costs two float64 matrix products over its tokens. After the last block the forward is
stopped: the final norm and the LM head contribute nothing to the statistics.

Outlier tokens. Some models grow "massive activations": from some depth on, a few tokens (in
SmolLM2 the first token of every window, from block 12) have hidden states 100x larger than the
rest, and any norm-weighted statistic (Gram matrices, least squares, the linearity score) is then
about them alone. A token is an outlier at h_i when its norm exceeds `outlier_factor` times the
median norm of its own sequence at h_i (a per-sequence rule, so it does not depend on batching or
sharding); it is an outlier for the pair (h_i, h_j) when it is one at either end. Besides the
statistics over all tokens, each pair keeps the (few) outlier tokens' own sums, so statistics
without outliers are the difference, and metrics are reported both ways.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Self

import torch

from compressor.adapters import get_adapter
from compressor.calibrate.metrics import angular_distance
from compressor.calibrate.stats import F64, Stats
from compressor.errors import UnsupportedArchitectureError
from compressor.util.gram import Gram
from compressor.util.hooks import StopForward, hidden_of
from compressor.util.progress import track

log = logging.getLogger(__name__)


class Collector:
    """Owns the hooks and the accumulators of one calibration run (use as a context manager)."""

    def __init__(self, model, spans_max: int, outlier_factor: float | None = None, pairs=(),
                 stop_early: bool = True, points: int = 0):
        self.blocks = get_adapter(model).blocks_of(model)
        self.L = len(self.blocks)
        self.spans_max = spans_max
        self.factor = outlier_factor
        self.pairs = sorted({(i, i + 1) for i in range(self.L)} | {tuple(p) for p in pairs})
        self._last_use = {i: max(j for (a, j) in self.pairs if a == i) for (i, _) in self.pairs}
        self.stop_early = stop_early
        self.points = points
        self.samples: torch.Tensor | None = None  # [L+1, points, d] float32 token vectors for TwoNN
        self.grams: dict[int, Gram] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.cross: dict[tuple[int, int], torch.Tensor] = {}
        self.outliers: dict[tuple[int, int], torch.Tensor] = {}
        self.cos: dict[int, torch.Tensor] = {}
        self.contrib: dict[int, torch.Tensor] = {}
        self.count = 0
        self.sequences = 0
        self.span_sum = torch.zeros(self.L, spans_max, dtype=F64)
        self._handles: list = []
        self._checked = False

    # --- hooks ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            for index, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_hook(self._hook(index), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = hidden_of(output)
            if index == 0:
                self._state(0, x)
            elif not self._checked:
                self._check_chain(index, x)
            self._state(index + 1, y)
            self._block(index)
            if index == self.L - 1 and self.stop_early:
                raise StopForward

        return hook

    # --- one batch -----------------------------------------------------------------------
    def run_batch(self, model, input_ids: torch.Tensor, mask: torch.Tensor | None,
                  picks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Forward one batch [B, T] and add its statistics; `picks` = (rows, b, t): TwoNN tokens."""
        self._mask = mask
        self._index: dict[torch.device, torch.Tensor] = {}
        self._kept: dict[int, _Kept] = {}
        self._last: dict[int, torch.Tensor] = {}
        self._picked: dict[int, torch.Tensor] = {}
        self._picks = picks
        B = input_ids.shape[0]
        self._last_pos = (mask.shape[1] - 1 - mask.flip(1).int().argmax(1)) if mask is not None else None
        device = _input_device(model)
        kwargs = {"input_ids": input_ids.to(device), "use_cache": False}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device=device, dtype=torch.long)
        try:
            model(**kwargs)
        except StopForward:
            pass
        if len(self._last) != self.L + 1:
            raise UnsupportedArchitectureError(
                f"only {len(self._last) - 1} of {self.L} decoder blocks ran during the forward pass: "
                "this model's block loop is not supported by calibrate")
        self._checked, self._raw = True, None
        self.count += int(mask.sum()) if mask is not None else input_ids.numel()
        self.sequences += B
        last = torch.stack([self._last[i].to("cpu", F64) for i in range(self.L + 1)], dim=1)
        for n in range(1, min(self.spans_max, self.L) + 1):
            self.span_sum[: self.L + 1 - n, n - 1] += angular_distance(last[:, :-n], last[:, n:]).sum(0)
        if picks is not None and self.points:
            if self.samples is None:
                self.samples = torch.zeros(self.L + 1, self.points, last.shape[-1])
            for i, vectors in self._picked.items():
                self.samples[i, picks[0]] = vectors.to("cpu", torch.float32)
        self._kept.clear()

    def _flat(self, h: torch.Tensor) -> torch.Tensor:
        """The real tokens of h [B, T, d] as [n, d]."""
        flat = h.reshape(-1, h.shape[-1])
        if self._mask is None:
            return flat
        if h.device not in self._index:
            self._index[h.device] = self._mask.reshape(-1).nonzero().squeeze(1).to(h.device)
        return flat.index_select(0, self._index[h.device])

    def _state(self, i: int, h: torch.Tensor) -> None:
        """Add hidden state h_i of this batch to the per-state sums; keep it for the pairs ahead."""
        h = h.detach()
        norms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32)  # [B, T]
        flat = self._flat(h)
        x = flat.to(F64)
        if i not in self.grams:
            self.grams[i] = Gram(x.shape[1], device=x.device)
            self.sums[i] = torch.zeros(x.shape[1], dtype=F64, device=x.device)
        self.grams[i].add(x)
        self.sums[i].add_(x.sum(0))
        self._kept[i] = _Kept(x, flat.float(), self._flat(norms.unsqueeze(-1)).squeeze(1), self._flags(norms))
        if self._last_pos is None:
            self._last[i] = h[:, -1]
        else:
            self._last[i] = h[torch.arange(h.shape[0], device=h.device), self._last_pos.to(h.device)]
        if self._picks is not None:
            _, b, t = self._picks
            self._picked[i] = h[b.to(h.device), t.to(h.device)]
        if not self._checked:
            self._raw = h

    def _flags(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Outlier tokens: norm above factor x the median norm of their own sequence ([n] bool)."""
        if not self.factor:
            return None
        if self._mask is not None:
            mask = self._mask.to(norms.device)
            median = norms.masked_fill(~mask, float("nan")).nanmedian(dim=1, keepdim=True).values
            flags = (norms > self.factor * median) & mask
        else:
            flags = norms > self.factor * norms.median(dim=1, keepdim=True).values
        return self._flat(flags.unsqueeze(-1)).squeeze(1)

    def _block(self, index: int) -> None:
        """Pair statistics ending at h_{index+1}, per-token block metrics, then drop dead states."""
        j = index + 1
        y = self._kept[j]
        for i in [a for (a, b) in self.pairs if b == j]:
            x = self._kept[i].to(y.x64.device)
            if (i, j) not in self.cross:
                self.cross[(i, j)] = torch.zeros(y.x64.shape[1], y.x64.shape[1], dtype=F64, device=y.x64.device)
            self.cross[(i, j)].addmm_(x.x64.T, y.x64)
            if y.flags is not None:
                self._outliers(i, j, x.x64, y.x64, x.flags | y.flags)
            if i == index:
                self._per_token(index, x, y)
        for i in [i for i in self._kept if self._last_use.get(i, -1) <= j and i < j]:
            del self._kept[i]

    def _per_token(self, index: int, x: _Kept, y: _Kept) -> None:
        # float32 is plenty for means of per-token ratios (unlike sums of squares).
        cos = torch.linalg.vecdot(x.flat, y.flat).float() / (x.norms * y.norms).clamp_min(1e-30)
        contrib = torch.linalg.vector_norm(y.flat - x.flat, dim=1, dtype=torch.float32) / x.norms.clamp_min(1e-30)
        if index not in self.cos:
            self.cos[index] = torch.zeros((), dtype=F64, device=y.x64.device)
            self.contrib[index] = torch.zeros((), dtype=F64, device=y.x64.device)
        self.cos[index].add_(cos.sum(dtype=F64))
        self.contrib[index].add_(contrib.sum(dtype=F64))

    def _outliers(self, i: int, j: int, x: torch.Tensor, y: torch.Tensor, flags: torch.Tensor) -> None:
        rows = flags.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        xo, yo = x.index_select(0, rows), y.index_select(0, rows)
        d = x.shape[1]
        if (i, j) not in self.outliers:
            self.outliers[(i, j)] = torch.zeros(1 + 2 * d + 3 * d * d, dtype=F64, device=y.device)
        flat = self.outliers[(i, j)]
        flat[0] += rows.numel()
        flat[1:1 + d] += xo.sum(0)
        flat[1 + d:1 + 2 * d] += yo.sum(0)
        xx, xy, yy = flat[1 + 2 * d:].view(3, d, d)
        xx.addmm_(xo.T, xo)
        xy.addmm_(xo.T, yo)
        yy.addmm_(yo.T, yo)

    def _check_chain(self, index: int, x: torch.Tensor) -> None:
        """Block l's input must be block l-1's output, or the shared Grams would be wrong."""
        prev = self._raw
        if x is prev or (x.shape == prev.shape and torch.equal(x.detach(), prev.to(x.device))):
            return
        raise UnsupportedArchitectureError(
            f"block {index}'s input is not block {index - 1}'s output in this model: "
            "calibrate needs a plain stack of decoder blocks")

    # --- result --------------------------------------------------------------------------
    def stats(self) -> Stats:
        """The accumulated statistics as CPU float64 `Stats`. Hands the accumulators over (so memory
        does not double at the end): call it once, after the last batch."""
        if not self.grams:
            raise ValueError("no batches were run")
        cpu = {"dtype": F64, "device": "cpu"}
        d = self.grams[0].xtx.shape[0]
        grams = torch.empty(self.L + 1, d, d, **cpu)
        for i in range(self.L + 1):
            grams[i].copy_(self.grams.pop(i).xtx)
        return Stats(
            count=torch.tensor(float(self.count), **cpu),
            sums=torch.stack([self.sums[i].to(**cpu) for i in range(self.L + 1)]),
            grams=grams,
            cross={k: v.to(**cpu) for k, v in self.cross.items()},
            cos_sum=torch.stack([self.cos[i].to(**cpu) for i in range(self.L)]),
            contrib_sum=torch.stack([self.contrib[i].to(**cpu) for i in range(self.L)]),
            sequences=torch.tensor(float(self.sequences), **cpu),
            span_sum=self.span_sum.clone(),
            outliers={k: v.to(**cpu) for k, v in self.outliers.items()},
            outlier_factor=self.factor,
        )


class _Kept(NamedTuple):
    """One hidden state of the current batch, real tokens only."""

    x64: torch.Tensor             # [n, d] float64, for the Gram products
    flat: torch.Tensor            # [n, d] float32
    norms: torch.Tensor           # [n] float32
    flags: torch.Tensor | None    # [n] outlier tokens

    def to(self, device) -> _Kept:
        if self.x64.device == device:
            return self
        return _Kept(*(None if t is None else t.to(device) for t in self))


def _input_device(model) -> torch.device:
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def collect(model, windows: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 8,
            spans_max: int | None = None, outlier_factor: float | None = 20.0, pairs=(),
            picks: torch.Tensor | None = None, points: int = 0) -> tuple[Stats, torch.Tensor | None]:
    """Run `windows` [N, T] through `model` in batches; return this process's `Stats` and samples.

    `picks` [m, 3] lists (row, window, position): the token vectors to copy into row `row` of the
    TwoNN sample buffer [L+1, points, d] (returned; zeros in rows other ranks fill).
    """
    num_blocks = get_adapter(model).num_blocks(model)
    spans_max = num_blocks if not spans_max else min(spans_max, num_blocks)
    collector = Collector(model, spans_max, outlier_factor, pairs, points=points if picks is not None else 0)
    starts = range(0, windows.shape[0], batch_size)
    with torch.no_grad(), collector:
        for start in track(starts, len(starts), "calibrating"):
            stop = start + batch_size
            mask = None if attention_mask is None else attention_mask[start:stop].bool()
            collector.run_batch(model, windows[start:stop], mask, _batch_picks(picks, start, stop))
    stats = collector.stats()
    if picks is not None and collector.samples is None:
        collector.samples = torch.zeros(stats.num_blocks + 1, points, stats.hidden_size)
    return stats, collector.samples


def _batch_picks(picks, start, stop):
    if picks is None:
        return None
    sel = (picks[:, 1] >= start) & (picks[:, 1] < stop)
    return picks[sel, 0], picks[sel, 1] - start, picks[sel, 2]
