"""Sufficient statistics of a calibration run: float64 sums that merge by addition.

Hidden state h_0 is the input of block 0 and h_{l+1} the output of block l, so block l maps
h_l -> h_{l+1} and consecutive blocks share Gram matrices. For every token that calibration
saw, `Stats` holds

- count, sums[i] = sum h_i, grams[i] = sum h_i h_i'            (i = 0..L)
- cross[(i, j)] = sum h_i h_j' for each pair: (l, l+1) always, plus any extra spans asked for
- per block: sums of cos(h_l, h_{l+1}) and ||h_{l+1} - h_l|| / ||h_l||
- per pair: the same sums restricted to *outlier* tokens (see `compressor.calibrate.collect`),
  kept only for pairs that had any, so statistics without them are `whole - outliers`
- per (start, length): sums of the angular distance at each sequence's last real token.

Everything is a sum over tokens (or sequences), so runs over parts of the data combine with `+`
and ranks combine with `all_reduce_`. Pair statistics for (x, y - x) follow from those of (x, y):
X'D = X'Y - X'X and D'D = Y'Y - X'Y - Y'X + X'X.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

F64 = torch.float64


@dataclass
class PairStats:
    """Raw sums over n token pairs (x, y): all a least-squares fit y ~ x needs."""

    n: float
    sx: torch.Tensor
    sy: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor
    yy: torch.Tensor

    def centered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Sxx, Sxy, Syy): Gram matrices of the centred data, X'X - n mx mx' and so on."""
        mx, my = self.sx / self.n, self.sy / self.n
        return (self.xx - self.n * torch.outer(mx, mx), self.xy - self.n * torch.outer(mx, my),
                self.yy - self.n * torch.outer(my, my))

    def residual(self) -> PairStats:
        """Statistics of (x, y - x): what the block adds to the residual stream."""
        return PairStats(self.n, self.sx, self.sy - self.sx, self.xx, self.xy - self.xx,
                         self.yy - self.xy - self.xy.T + self.xx)

    def __sub__(self, other: PairStats) -> PairStats:
        return PairStats(self.n - other.n, self.sx - other.sx, self.sy - other.sy, self.xx - other.xx,
                         self.xy - other.xy, self.yy - other.yy)


@dataclass
class Stats:
    """Float64 sufficient statistics of hidden states h_0..h_L (see the module docstring)."""

    count: torch.Tensor                      # scalar: tokens
    sums: torch.Tensor                       # [L+1, d]
    grams: torch.Tensor                      # [L+1, d, d]
    cross: dict[tuple[int, int], torch.Tensor]
    cos_sum: torch.Tensor                    # [L]
    contrib_sum: torch.Tensor                # [L]
    sequences: torch.Tensor                  # scalar
    span_sum: torch.Tensor                   # [L, spans_max]: start, length - 1
    outliers: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # [1 + 2d + 3d^2] flat
    outlier_factor: float | None = None

    # --- shape -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.grams.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.grams.shape[-1]

    @property
    def tokens(self) -> int:
        return int(self.count.item())

    # --- views ---------------------------------------------------------------------------
    def pair(self, i: int, j: int, outliers: bool = True) -> PairStats:
        """Statistics of (h_i, h_j); `outliers=False` leaves out the outlier tokens of that pair."""
        whole = PairStats(float(self.count), self.sums[i], self.sums[j], self.grams[i], self.cross[(i, j)],
                          self.grams[j])
        if outliers or (i, j) not in self.outliers:
            return whole
        return whole - self._outlier_pair(i, j)

    def block(self, index: int, outliers: bool = True) -> PairStats:
        """Statistics of block `index`: (input, output)."""
        return self.pair(index, index + 1, outliers)

    def outlier_count(self, i: int, j: int) -> int:
        part = self.outliers.get((i, j))
        return 0 if part is None else int(part[0].item())

    def _outlier_pair(self, i: int, j: int) -> PairStats:
        d, flat = self.hidden_size, self.outliers[(i, j)]
        sx, sy = flat[1:1 + d], flat[1 + d:1 + 2 * d]
        xx, xy, yy = flat[1 + 2 * d:].view(3, d, d)
        return PairStats(float(flat[0]), sx, sy, xx, xy, yy)

    # --- combining -----------------------------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sums, self.grams, self.cos_sum, self.contrib_sum, self.sequences,
                self.span_sum, *(self.cross[k] for k in sorted(self.cross))]

    def merge_(self, other: Stats) -> Stats:
        """Add `other` (statistics of other tokens) into this one, in place."""
        if sorted(self.cross) != sorted(other.cross) or self.grams.shape != other.grams.shape:
            raise ValueError("cannot merge statistics of different models or pair sets")
        if self.outlier_factor != other.outlier_factor:
            raise ValueError("cannot merge statistics taken with different outlier factors")
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.add_(theirs.to(mine.device))
        for key, part in other.outliers.items():
            if key in self.outliers:
                self.outliers[key].add_(part.to(self.outliers[key].device))
            else:
                self.outliers[key] = part.clone()
        return self

    def merge(self, other: Stats) -> Stats:
        return self.copy().merge_(other)

    __add__ = merge

    def copy(self) -> Stats:
        return Stats(**{**self.__dict__, **_map(self, lambda t: t.clone())})

    def to(self, device) -> Stats:
        return Stats(**{**self.__dict__, **_map(self, lambda t: t.to(device, F64))})

    def all_reduce_(self) -> Stats:
        """Sum over all ranks of torch.distributed (a no-op without it). Every rank gets the total."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        keys = sorted(self.cross)
        present = torch.tensor([k in self.outliers for k in keys], dtype=torch.int32, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        size = 1 + 2 * self.hidden_size + 3 * self.hidden_size ** 2
        for key, flag in zip(keys, present.tolist(), strict=True):
            if flag and key not in self.outliers:
                self.outliers[key] = torch.zeros(size, dtype=F64, device=self.grams.device)
        for tensor in self._tensors() + [self.outliers[k] for k in sorted(self.outliers)]:
            buffer = tensor.to(device)
            dist.all_reduce(buffer)
            tensor.copy_(buffer)
        return self

    # --- files ---------------------------------------------------------------------------
    def save(self, path: Path | str) -> None:
        """Write a safetensors file (float64) with the metadata needed to read it back."""
        from safetensors.torch import save_file

        tensors = {"count": self.count, "sums": self.sums, "grams": self.grams, "cos_sum": self.cos_sum,
                   "contrib_sum": self.contrib_sum, "sequences": self.sequences, "span_sum": self.span_sum}
        tensors |= {f"cross.{i}.{j}": t for (i, j), t in self.cross.items()}
        tensors |= {f"outliers.{i}.{j}": t for (i, j), t in self.outliers.items()}
        meta = {"format": "compressor-stats-1", "outlier_factor": json.dumps(self.outlier_factor)}
        save_file({k: v.detach().to("cpu", F64).contiguous() for k, v in tensors.items()}, str(path), meta)

    @classmethod
    def load(cls, path: Path | str) -> Stats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            data = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)

        def keyed(prefix):
            return {tuple(int(x) for x in k.split(".")[1:]): v for k, v in data.items() if k.startswith(prefix)}

        return cls(data["count"], data["sums"], data["grams"], keyed("cross."), data["cos_sum"],
                   data["contrib_sum"], data["sequences"], data["span_sum"], keyed("outliers."),
                   json.loads(meta.get("outlier_factor", "null")))


def _map(stats: Stats, fn) -> dict:
    out = {}
    for name, value in stats.__dict__.items():
        if isinstance(value, torch.Tensor):
            out[name] = fn(value)
        elif isinstance(value, dict):
            out[name] = {k: fn(v) for k, v in value.items()}
    return out
