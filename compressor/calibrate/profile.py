"""The calibration profile: per-block metrics and span distances, computed from `Stats`.

`calibrate(model, windows)` streams the windows through the model (`collect`), all-reduces the
statistics under torch.distributed (each rank takes windows[rank::world]), and turns them into a
`Profile`, a plain dataclass that round-trips through JSON (`to_dict` / `from_dict`); the raw
float64 statistics ride along in `.stats` for later fitting (they are not part of the JSON).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from compressor.calibrate.collect import collect
from compressor.calibrate.metrics import anisotropy, linearities, one_thread
from compressor.calibrate.stats import Stats
from compressor.calibrate.twonn import twonn
from compressor.errors import DataError
from compressor.util.parallel import all_reduce_, rank_world
from compressor.util.progress import status

log = logging.getLogger(__name__)

DEFAULT_OUTLIER_FACTOR = 20.0
DEFAULT_TWONN_POINTS = 1000


@dataclass
class BlockMetrics:
    """What one decoder block does to the residual stream (x = its input, y = its output)."""

    index: int
    linearity: float                           # paper's score of y ~ x, all tokens
    linearity_without_residual: float          # ... of (y - x) ~ x
    block_influence: float                     # 1 - mean cos(x, y) (ShortGPT)
    relative_contribution: float               # mean ||y - x|| / ||x||
    anisotropy: float                          # top eigenvalue / trace of cov(x)
    linearity_no_outliers: float = math.nan    # the same three without the pair's outlier tokens
    linearity_without_residual_no_outliers: float = math.nan
    anisotropy_no_outliers: float = math.nan
    outlier_tokens: int = 0                    # tokens left out of the *_no_outliers metrics
    intrinsic_dim: float | None = None         # TwoNN of x on a subsample (when asked for)


@dataclass
class SpanMetrics:
    """Angular distance between h_start and h_{start+length} at each sequence's last real token."""

    start: int
    length: int
    angular_distance: float


@dataclass
class Profile:
    model: str
    tokens: int
    sequences: int
    blocks: list[BlockMetrics]
    spans: list[SpanMetrics]
    settings: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    stats: Stats | None = field(default=None, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def span(self, start: int, length: int) -> float:
        for s in self.spans:
            if s.start == start and s.length == length:
                return s.angular_distance
        raise KeyError(f"no span start={start} length={length} in this profile (spans_max too small?)")

    def to_dict(self) -> dict:
        return {
            "model": self.model, "tokens": self.tokens, "sequences": self.sequences,
            "blocks": [_clean(asdict(b)) for b in self.blocks],
            "spans": [_clean(asdict(s)) for s in self.spans],
            "settings": self.settings, "fingerprints": self.fingerprints,
        }

    @classmethod
    def from_dict(cls, data: dict, stats: Stats | None = None) -> Profile:
        known = {f.name for f in fields(BlockMetrics)}
        blocks = [BlockMetrics(**{k: v if k == "intrinsic_dim" else _nan(v) for k, v in b.items() if k in known})
                  for b in data["blocks"]]
        spans = [SpanMetrics(**{k: _nan(v) for k, v in s.items()}) for s in data["spans"]]
        return cls(data.get("model", ""), int(data["tokens"]), int(data.get("sequences", 0)), blocks, spans,
                   dict(data.get("settings", {})), dict(data.get("fingerprints", {})), stats)

    def to_csv(self) -> str:
        """One row per block, every metric a column."""
        buffer = io.StringIO()
        names = [f.name for f in fields(BlockMetrics)]
        writer = csv.DictWriter(buffer, fieldnames=["depth", *names], lineterminator="\n")
        writer.writeheader()
        for b in self.blocks:
            writer.writerow({"depth": round(b.index / max(1, self.num_blocks - 1), 6), **asdict(b)})
        return buffer.getvalue()


def _clean(d: dict) -> dict:
    """NaN is not JSON: write null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _nan(v):
    return math.nan if v is None else v


def metrics_from_stats(stats: Stats, samples: torch.Tensor | None = None) -> tuple[list, list]:
    """(blocks, spans) of a profile, from statistics alone (and TwoNN samples [L+1, M, d])."""
    with one_thread():
        return _blocks(stats, samples), _spans(stats)


def _blocks(stats: Stats, samples: torch.Tensor | None) -> list[BlockMetrics]:
    n = stats.count.item()
    blocks = []
    for index in range(stats.num_blocks):
        whole = stats.block(index)
        lin, lin_res = linearities(whole)
        outliers = stats.outlier_count(index, index + 1)
        if outliers:
            clean = stats.block(index, outliers=False)
            lin_c, lin_res_c = linearities(clean)
            aniso_c = anisotropy(clean)
        else:
            lin_c, lin_res_c, aniso_c = lin, lin_res, None
        aniso = anisotropy(whole)
        blocks.append(BlockMetrics(
            index=index, linearity=lin, linearity_without_residual=lin_res,
            block_influence=1.0 - float(stats.cos_sum[index]) / n,
            relative_contribution=float(stats.contrib_sum[index]) / n, anisotropy=aniso,
            linearity_no_outliers=lin_c, linearity_without_residual_no_outliers=lin_res_c,
            anisotropy_no_outliers=aniso if aniso_c is None else aniso_c, outlier_tokens=outliers,
            intrinsic_dim=None if samples is None else twonn(samples[index]),
        ))
    return blocks


def _spans(stats: Stats) -> list[SpanMetrics]:
    spans = []
    sequences = stats.sequences.item()
    L, S = stats.span_sum.shape
    for length in range(1, S + 1):
        for start in range(L + 1 - length):
            spans.append(SpanMetrics(start, length, float(stats.span_sum[start, length - 1]) / sequences))
    return spans


def calibrate(
    model,
    windows: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    spans_max: int | None = None,
    intrinsic_dim: bool = False,
    exclude_outliers: float | None = DEFAULT_OUTLIER_FACTOR,
    pairs=(),
    seed: int = 0,
    twonn_points: int = DEFAULT_TWONN_POINTS,
    name: str | None = None,
) -> Profile:
    """Profile every decoder block of `model` over `windows` [N, T] (token ids).

    attention_mask: [N, T], 0 where padding (such tokens enter no statistic).
    spans_max: longest span for angular distances (default: all lengths).
    exclude_outliers: norm factor over the per-sequence median above which a token counts as an
        outlier for the *_no_outliers metrics (None or 0: no outlier statistics).
    pairs: extra (i, j) hidden-state pairs whose cross Gram to keep in `.stats` (span fits).
    Under torch.distributed each rank processes windows[rank::world]; all ranks get the total.
    """
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise DataError(f"calibration windows must be a non-empty [samples, seq_len] tensor, "
                        f"not {tuple(windows.shape)}")
    if attention_mask is not None and attention_mask.shape != windows.shape:
        raise DataError("attention_mask must have the shape of the windows")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1 (got {batch_size})")
    rank, world = rank_world()
    if windows.shape[0] < world:
        raise DataError(f"{windows.shape[0]} windows cannot be shared by {world} ranks: pass at least {world}")
    ids = torch.arange(windows.shape[0])[rank::world]
    picks = _twonn_picks(windows, attention_mask, twonn_points, seed, ids) if intrinsic_dim else None
    points = 0 if picks is None else min(twonn_points, _real_tokens(windows, attention_mask))
    mask = None if attention_mask is None else attention_mask[ids]
    stats, samples = collect(model, windows[ids], mask, batch_size, spans_max, exclude_outliers or None, pairs,
                             picks, points)
    stats.all_reduce_()
    if samples is not None and world > 1:
        all_reduce_(samples)
    if stats.tokens < 10 * stats.hidden_size:
        log.warning("only %d tokens for hidden size %d: linearity scores are inflated (pure noise would "
                    "score about d/n = %.2f); use at least %d tokens", stats.tokens, stats.hidden_size,
                    stats.hidden_size / stats.tokens, 10 * stats.hidden_size)
    status("computing metrics")
    blocks, spans = metrics_from_stats(stats, samples)
    settings = {"batch_size": batch_size, "spans_max": stats.span_sum.shape[1], "intrinsic_dim": intrinsic_dim,
                "outlier_factor": exclude_outliers or None, "pairs": [list(p) for p in pairs],
                "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "hidden_size": stats.hidden_size}
    if intrinsic_dim:
        settings |= {"twonn_points": twonn_points, "seed": seed}
    return Profile(name or _model_name(model), stats.tokens, int(stats.sequences.item()), blocks, spans,
                   settings, {}, stats)


def _real_tokens(windows, mask) -> int:
    return windows.numel() if mask is None else int(mask.bool().sum())


def _twonn_picks(windows, mask, points, seed, ids) -> torch.Tensor:
    """This rank's share of `points` random real tokens chosen over all windows (the same on every
    rank): [m, 3] = (row in the sample buffer, window in this rank's shard, position)."""
    valid = (torch.ones_like(windows, dtype=torch.bool) if mask is None else mask.bool()).reshape(-1)
    candidates = valid.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:points]].sort().values
    local = torch.full((windows.shape[0],), -1, dtype=torch.long)
    local[ids] = torch.arange(len(ids))
    window = local[chosen // windows.shape[1]]
    mine = window >= 0
    return torch.stack([mine.nonzero().squeeze(1), window[mine], (chosen % windows.shape[1])[mine]], dim=1)


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "model_type", "model"))
