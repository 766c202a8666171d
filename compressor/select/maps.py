"""Linear replacement of block spans (ReplaceMe form), fitted in closed form on calibration tokens.

A span [s, e) of blocks is replaced by a linear map T folded into the MLP output projection of
block s - 1. With M that projection's output, h_s the input of block s (= output of block s - 1)
and h_e the output of block e - 1, the pruned model computes h_s - M + M T where the original
computed h_e, so T is the ridge least-squares solution of

    M T ~ h_e - h_s + M          over real calibration tokens,

from normal equations accumulated in float64 while the windows stream through the model (memory
is d x d per span, flat in the number of tokens), over real tokens only (the attention mask).

Two forms of the same replacement, both folded into that one projection (same parameter count):
- "map" (ReplaceMe): the d x d map T above; the projection's weight becomes W T.
- "projection" (ours): refit the projection itself, new output = a B + c with a its own input
  (the MLP's hidden activation, d_ff wide), by least squares on the same target. Since a W T is
  one such readout, this is at least as expressive; on SmolLM2 it cut the held-out loss increase
  of folding blocks 13-18 from 0.47 to 0.41 nats and of 12-17 from 0.58 to 0.48.

Ridge pulls T towards the identity (B towards the projection's own weight), not towards zero: (X'X + lambda I) T = X'Y + lambda I with
lambda = ridge * trace(X'X) / d. A direction the calibration tokens never excite then passes
through unchanged, which is exactly what removing the span without a map would do.

Massive activations. In SmolLM2 the first token of every window reaches 100-165x the norm of the
others from block 12 on, and that token dominates the Gram matrix. We measured leaving such
tokens out of the fit (first position, and tokens above 20x their sequence's median norm) and it is
harmful: the map must carry them too, since every token passes through the projection it is folded
into. Folding block 10 alone raised held-out loss by 1.17 nats with the first token left out and by
0.15 with it in; block 12 by 3.57 with outliers left out and by 0.09 with them in; elsewhere the
difference was below 0.001. So by default every real token is fitted, unweighted; `exclude_first`
and `outlier_factor` remain as settings for models where the opposite holds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from compressor.adapters import get_adapter
from compressor.errors import InvalidPlanError
from compressor.surgery.edit import blocks_removed
from compressor.surgery.plan import Projection, Replacement
from compressor.util.gram import Gram
from compressor.util.hooks import block_recorder, forward_until_stop, injector, projection_recorder
from compressor.util.parallel import all_reduce_, all_reduce_sum, rank_world, shard
from compressor.util.progress import track

log = logging.getLogger(__name__)

F64 = torch.float64
DEFAULT_RIDGE = 1e-3


FORMS = ("map", "projection")


@dataclass
class FitSettings:
    form: str = "map"                        # "map" (ReplaceMe: W -> W T) or "projection" (refit W, b)
    ridge: float = DEFAULT_RIDGE
    exclude_first: bool = False              # leave each window's first token out of the fit
    outlier_factor: float | None = None      # leave out tokens above this x their sequence's median norm
    batch_size: int = 8


class NormalEquations(Gram):
    """Streaming sums for the least-squares fit Y ~ X B (float64, constant memory), and its solution."""

    def __init__(self, d_in: int, d_out: int | None = None, device=None):
        super().__init__(d_in, d_out or d_in, device=device)
        self.excluded = 0

    def all_reduce_(self) -> NormalEquations:
        """Sum the statistics over ranks under torch.distributed (in place; alone, nothing changes)."""
        if rank_world()[1] > 1:
            all_reduce_(self.xtx)
            all_reduce_(self.xty)
            self.yy, tokens, excluded = all_reduce_sum([self.yy, self.tokens, self.excluded])
            self.tokens, self.excluded = int(tokens), int(excluded)
        return self

    def solve(self, ridge: float = DEFAULT_RIDGE, prior: torch.Tensor | None = None) -> torch.Tensor:
        """argmin ||X B - Y||^2 + lambda ||B - prior||^2, lambda = ridge * trace(X'X) / d_in;
        prior defaults to the identity (a map that changes nothing)."""
        if self.tokens == 0:
            raise InvalidPlanError("no calibration tokens were left to fit a linear map: pass more data")
        d = self.xtx.shape[0]
        lam = ridge * float(torch.diagonal(self.xtx).sum()) / d
        eye = torch.eye(d, dtype=F64, device=self.xtx.device)
        prior = eye if prior is None else prior.to(self.xty)
        return torch.linalg.solve(self.xtx + lam * eye, self.xty + lam * prior)

    def relative_error(self, B: torch.Tensor) -> float:
        """||Y - X B||^2 / ||Y||^2 over the fitted tokens, from the sums alone."""
        sse = self.yy - 2 * float((B * self.xty).sum()) + float((B * (self.xtx @ B)).sum())
        return max(sse, 0.0) / max(self.yy, 1e-300)


def token_mask(shape, attention_mask: torch.Tensor | None, tensors: Iterable[torch.Tensor],
               exclude_first: bool, outlier_factor: float | None) -> torch.Tensor:
    """[B, T] bool: the tokens a fit may use (see the module docstring)."""
    keep = torch.ones(shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if exclude_first:
        first = keep.int().argmax(dim=1)  # first real position of each window
        keep[torch.arange(shape[0]), first] = False
    if outlier_factor:
        for h in tensors:
            norms = h.detach().float().norm(dim=-1).cpu()
            median = norms.masked_fill(~keep, float("nan")).nanmedian(dim=1, keepdim=True).values
            keep &= ~(norms > outlier_factor * median.nan_to_num(float("inf")))
    return keep


@contextlib.contextmanager
def folded_outputs(model, maps: dict[int, Replacement]):
    """For the `with`: block i's MLP output projection returns proj(x) @ T for a map T, or the
    refitted projection's output for a Projection (weights untouched)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    handles = []

    def hook_for(replacement):
        def hook(module, args, output):
            if isinstance(replacement, Projection):
                return replacement(args[0]).to(output.dtype).reshape(output.shape)
            return (output.to(F64) @ replacement.to(output.device)).to(output.dtype)

        return hook

    try:
        for i, replacement in maps.items():
            r = replacement if isinstance(replacement, Projection) else replacement.to(F64)
            handles.append(adapter.mlp_out_of(blocks[i]).register_forward_hook(hook_for(r)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def modified(model, drop: Iterable[int] = (), maps: dict[int, Replacement] | None = None):
    """Run the model as if `maps` were folded (block -> T) and `drop` removed, original numbering."""
    with folded_outputs(model, maps or {}), blocks_removed(model, sorted(drop)):
        yield


def accumulate(model, windows: torch.Tensor, pairs: list[tuple[int, int]], settings: FitSettings | None = None,
               attention_mask: torch.Tensor | None = None, drop: Iterable[int] = (),
               maps: dict[int, Replacement] | None = None, description: str = "fitting linear maps",
               ) -> dict[tuple[int, int], NormalEquations]:
    """Normal equations for folding the work of blocks owner+1 .. last into `owner`'s projection.

    For each (owner, last) pair (original numbering): X = owner's MLP output projection M, target
    h_out(last) - h_out(owner) + M, on the model as modified by `drop` and `maps` (owner and last
    must be kept; blocks between them may already be removed). One streaming pass; the forward
    stops after the deepest block any pair needs. With settings.form "projection", X is the
    projection's input instead (plus a column of ones where it has a bias).
    """
    return _stream(model, windows, pairs, settings or FitSettings(), attention_mask, set(drop), maps, description)[0]


def _stream(model, windows, pairs, settings: FitSettings, attention_mask, drop: set[int], maps, description,
            resume: tuple[int, list[torch.Tensor]] | None = None, keep: int | None = None):
    """accumulate(), optionally starting at block resume[0] from per-batch input states resume[1]
    (blocks before it are not run), and keeping block `keep`'s output and projection output.

    Under torch.distributed each rank streams its shard windows[rank::world] and the sums are
    all-reduced, so every rank gets the same equations; `kept` (and so `resume`) are per batch of
    the rank's own shard, so every rank must pass the same windows and batch size."""
    windows, attention_mask = shard(windows), shard(attention_mask)
    adapter = get_adapter(model)
    blocks = list(adapter.blocks_of(model))
    eqs = _equations(adapter, blocks, pairs, drop, settings.form)
    owners = {o for o, _ in pairs}
    outs = owners | {last for _, last in pairs}
    deepest = max(outs)
    projection = settings.form == "projection"
    seen: dict[str, torch.Tensor] = {}
    kept: list[tuple[torch.Tensor, ...]] = []

    skip = drop | (set(range(resume[0])) if resume else set())
    handles = []
    try:
        for i in outs:
            handles.append(blocks[i].register_forward_hook(block_recorder(seen, i, stop=i == deepest)))
        if resume:
            handles.append(blocks[resume[0]].register_forward_pre_hook(injector(seen), with_kwargs=True))
        with modified(model, skip, maps):
            # Registered after folded_outputs' hooks, so M is seen with any earlier map applied.
            for i in owners:
                recorder = projection_recorder(seen, i, inputs=projection)
                handles.append(adapter.mlp_out_of(blocks[i]).register_forward_hook(recorder))
            batches = range(0, windows.shape[0], settings.batch_size)
            for n, b in enumerate(track(batches, len(batches), description)):
                ids = windows[b:b + settings.batch_size]
                mask = None if attention_mask is None else attention_mask[b:b + settings.batch_size]
                seen.clear()
                if resume:
                    seen["resume"] = resume[1][n]
                forward_until_stop(model, ids, mask)
                for o, c in pairs:
                    _add(eqs[(o, c)], seen[f"m{o}"], seen[f"h{o}"], seen[f"h{c}"], mask, settings, seen.get(f"a{o}"))
                if keep is not None:
                    kept.append((seen[f"h{keep}"], seen[f"m{keep}"], seen.get(f"a{keep}")))
    finally:
        for h in handles:
            h.remove()
    for eq in eqs.values():  # every rank reaches this, with or without windows of its own
        eq.all_reduce_()
    return eqs, kept


def _equations(adapter, blocks, pairs, drop: set[int], form: str) -> dict[tuple[int, int], NormalEquations]:
    """Empty normal equations for each (owner, last) pair, after refusing pairs that cannot be fitted."""
    if form not in FORMS:
        raise InvalidPlanError(f"unknown linear replacement form '{form}': choose one of {', '.join(FORMS)}")
    eqs = {}
    for owner, last in pairs:
        if owner < 0:
            raise InvalidPlanError(f"span {owner + 1}-{last} starts at block 0: there is no earlier MLP projection "
                                   "to fold a map into; drop it without a linear replacement")
        if not owner < last < len(blocks) or owner in drop or last in drop:
            raise InvalidPlanError(f"span {owner + 1}-{last} does not fit this model or overlaps removed blocks")
        proj = adapter.mlp_out_of(blocks[owner])
        d_in, d_out = _shape(proj)
        # "projection" regresses on the projection's input (plus a column of ones for its bias)
        d_in = d_in + (getattr(proj, "bias", None) is not None) if form == "projection" else d_out
        eqs[(owner, last)] = NormalEquations(d_in, d_out, proj.weight.device)
    return eqs


def apply_map(h: torch.Tensor, m: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """The owner block's output once T is folded into its projection: h - M + M T."""
    m = m.reshape(h.shape)  # some blocks (OPT) run their MLP on flattened tokens
    eye = torch.eye(T.shape[0], dtype=F64, device=m.device)
    return (h.to(F64) + m.to(F64) @ (T.to(m.device, F64) - eye)).to(h.dtype)


def apply_replacement(h: torch.Tensor, m: torch.Tensor, a: torch.Tensor | None, r: Replacement) -> torch.Tensor:
    """The owner block's output with its projection replaced: h - M + (M T or a B + c)."""
    if not isinstance(r, Projection):
        return apply_map(h, m, r)
    return (h.to(F64) - m.reshape(h.shape).to(F64) + r(a).reshape(h.shape)).to(h.dtype)


@dataclass
class SpanFit:
    """One fitted span: its replacement and how it was fitted (goes into the plan's provenance)."""

    start: int
    end: int
    replacement: Replacement
    tokens: int
    excluded: int
    relative_error: float

    @property
    def form(self) -> str:
        return "projection" if isinstance(self.replacement, Projection) else "map"

    def provenance(self) -> dict:
        return {"start": self.start, "end": self.end, "form": self.form, "tokens": self.tokens,
                "excluded_tokens": self.excluded, "relative_error": round(self.relative_error, 6)}


def fit_spans(model, windows: torch.Tensor, drop: Iterable[int], spans: list[tuple[int, int]],
              settings: FitSettings | None = None, attention_mask: torch.Tensor | None = None) -> list[SpanFit]:
    """Fit the replacement of each span [s, e) of a plan, in order, each on the model as the plan
    leaves it upstream: every dropped block before s removed and every earlier replacement applied.
    So a later map learns from what earlier replacements really produce. Each pass resumes where
    the previous span ended, from the replaced hidden states, so all spans cost about one forward.
    """
    settings = settings or FitSettings()
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    drop = set(drop)
    fits: list[SpanFit] = []
    resume = None
    spans = sorted(spans)
    for k, (s, e) in enumerate(spans):
        upstream = {i for i in drop if i < s}
        eqs, kept = _stream(model, windows, [(s - 1, e - 1)], settings, attention_mask, upstream, None,
                            f"fitting blocks {s}-{e - 1}", resume, keep=s - 1 if k + 1 < len(spans) else None)
        eq = eqs[(s - 1, e - 1)]
        if settings.form == "projection":
            proj = adapter.mlp_out_of(blocks[s - 1])
            B = eq.solve(settings.ridge, prior=_readout(proj))
            replacement = Projection(B[:-1], B[-1]) if getattr(proj, "bias", None) is not None else Projection(B)
        else:
            B = eq.solve(settings.ridge)
            replacement = B
        fits.append(SpanFit(s, e, replacement, eq.tokens, eq.excluded, eq.relative_error(B)))
        log.info("fitted blocks %d-%d (%s) on %d tokens (%d left out): relative error %.4f",
                 s, e - 1, fits[-1].form, eq.tokens, eq.excluded, fits[-1].relative_error)
        if k + 1 < len(spans):  # kept: this rank's batches (none on a rank without windows)
            after = next(i for i in range(e, spans[k + 1][0]) if i not in drop)
            resume = (after, [apply_replacement(h, m, a, replacement) for h, m, a in kept])
    return fits


def _add(eq: NormalEquations, m, hs, he, mask, settings: FitSettings, a=None) -> None:
    m = m.reshape(hs.shape)  # some blocks (OPT) run their MLP on flattened tokens
    keep = token_mask(hs.shape[:2], mask, (m, hs, he), settings.exclude_first, settings.outlier_factor)
    keep = keep.to(hs.device)
    y = he[keep].to(F64) - hs[keep].to(F64) + m[keep].to(F64)
    if a is None:
        x = m[keep]
    else:
        x = a.reshape(*hs.shape[:2], a.shape[-1])[keep].to(F64)
        if eq.xtx.shape[0] == x.shape[1] + 1:  # the projection has a bias: fit an intercept too
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64, device=x.device)], dim=1)
    eq.add(x, y)
    eq.excluded += int(mask.sum() if mask is not None else keep.numel()) - int(keep.sum())


def _shape(proj) -> tuple[int, int]:
    """(d_in, d_out) of an MLP output projection: nn.Linear [out, in], GPT-2's Conv1D [in, out]."""
    w = proj.weight
    return (w.shape[1], w.shape[0]) if isinstance(proj, torch.nn.Linear) else (w.shape[0], w.shape[1])


def _readout(proj) -> torch.Tensor:
    """The projection as B [d_in (+1 for a bias row), d_out] with output = [input, 1] @ B."""
    w = proj.weight.detach().to(F64)
    B = w.T if isinstance(proj, torch.nn.Linear) else w
    bias = getattr(proj, "bias", None)
    return B if bias is None else torch.cat([B, bias.detach().to(F64)[None]], dim=0)


def fit_provenance(settings: FitSettings, fits: list[SpanFit]) -> dict:
    return {"form": settings.form, "ridge": settings.ridge, "exclude_first_token": settings.exclude_first,
            "outlier_factor": settings.outlier_factor, "spans": [f.provenance() for f in fits]}
