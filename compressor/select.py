"""Choosing which K blocks to remove, and which removed spans a linear map replaces.

Strategies are registered by name (`STRATEGIES`); each turns a calibration profile, and for the
measured ones the calibration loss, into a `Choice`. `make_plan` runs one and fits the maps.

- linearity: the K blocks with the highest linearity score (arXiv 2405.12250).
- influence: the K blocks with the lowest block influence, 1 - cos(in, out) (ShortGPT).
- angular:   the contiguous span of K blocks with the least angular distance (Gromov et al.).
- greedy:    K rounds, each removing the block whose removal raises held-out loss least (SLEB).
- auto:      greedy search in which every candidate is scored with its linear replacement already
             fitted and applied, against the best angular spans with their replacement; see _auto.

With `linear` on, the baselines get linear replacements afterwards (every run of removed blocks
that does not start at block 0); `auto` decides per run whether a map helps, and falls back to
plain removal where the architecture cannot fold a map (the adapter says why).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from compressor.adapters import get_adapter
from compressor.errors import InvalidPlanError
from compressor.linearize import FORMS, FitSettings, accumulate, apply_map, fit_provenance, fit_spans
from compressor.plan import Plan, ranges_text, runs
from compressor.progress import status
from compressor.scoring import Scorer

log = logging.getLogger(__name__)


@dataclass
class SelectSettings:
    linear: bool = True          # replace removed spans by fitted linear maps where possible
    score_windows: int = 8       # calibration windows held out to measure loss (greedy, auto)
    candidates: int = 6          # auto: candidates re-measured each round (best so far + neighbours)
    first_round: int = 12        # auto: candidates measured in the first round, shortlisted by profile
    spans: int = 3               # auto: contiguous spans (least angular distance) measured as a whole
    batch_size: int = 4          # windows per forward when scoring
    search_windows: int | None = None  # auto: calibration windows its maps are fitted on while it searches
                                       # (None: all but the held-out ones); the final fit uses them all
    fit: FitSettings = field(default_factory=FitSettings)


@dataclass
class Choice:
    """What a strategy decided. spans None: linearize every run that can be (when `linear`)."""

    drop: list[int]
    spans: list[tuple[int, int]] | None = None
    details: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)     # measured strategies: seconds, loss evaluations so far
    form: str | None = None                      # replacement form chosen by the strategy (else settings)


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[_Job, list[int]], dict[int, Choice]]
    description: str
    measured: bool = False
    needs_profile: bool = True


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, description: str, measured: bool = False, needs_profile: bool = True):
    """Decorator: add a strategy `fn(job, ks) -> {k: Choice}` to the registry (one call serves every K,
    so measured strategies search once, to the largest K, and keep the plan of each round asked for)."""
    def wrap(fn):
        STRATEGIES[name] = Strategy(name, fn, description, measured, needs_profile)
        return fn

    return wrap


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidPlanError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}") from None


class _Job:
    """Everything one selection run shares: the model, the data split, the profile, the scorer."""

    def __init__(self, model, windows, attention_mask, profile, settings: SelectSettings):
        self.model, self.windows, self.mask, self.settings = model, windows, attention_mask, settings
        self.adapter = get_adapter(model)
        self.n = self.adapter.num_blocks(model)
        self._profile = profile
        self.fold_refusal = self.adapter.why_no_fold(model.config)
        self.fold = settings.linear and self.fold_refusal is None
        n_windows = windows.shape[0]
        held = max(1, min(settings.score_windows, n_windows // 4))
        step = max(1, n_windows // held)
        score = torch.arange(step - 1, n_windows, step)[:held]
        held_out = set(score.tolist())
        fit = torch.tensor([i for i in range(n_windows) if i not in held_out] or sorted(held_out))
        self.score_index, self.fit_index = score, fit
        self._scorer: Scorer | None = None
        self.profile_seconds = 0.0
        self.started = time.perf_counter()

    @property
    def profile(self):
        if self._profile is None:
            from compressor.calibrate import calibrate, profile_for

            start = time.perf_counter()
            status("profiling blocks on the calibration windows")
            if self.mask is None:
                self._profile = profile_for(self.model, self.windows)
            else:
                self._profile = calibrate(self.model, self.windows, self.mask)
            self.profile_seconds = time.perf_counter() - start
        return self._profile

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            mask = None if self.mask is None else self.mask[self.score_index]
            self._scorer = Scorer(self.model, self.windows[self.score_index], mask, self.settings.batch_size)
        return self._scorer

    def cost_so_far(self) -> dict:
        scorer = self._scorer
        return {"select_seconds": round(time.perf_counter() - self.started - self.profile_seconds, 2),
                "loss_evaluations": scorer.evaluations if scorer else 0}

    def part(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The windows (and mask) of "fit", "search" (the fit windows auto searches with) or "score"."""
        index = self.fit_index if which != "score" else self.score_index
        cap = self.settings.search_windows
        if which == "search" and cap and cap < index.numel():
            index = index[torch.linspace(0, index.numel() - 1, cap).round().long()]
        return self.windows[index], (None if self.mask is None else self.mask[index])


# --- strategies from the profile -------------------------------------------------------------

@register("linearity", "the K blocks with the highest linearity score (arXiv 2405.12250)")
def _linearity(job: _Job, ks: list[int]) -> dict[int, Choice]:
    order = sorted(range(job.n), key=lambda i: (-_finite(job.profile.blocks[i].linearity), i))
    return {k: Choice(sorted(order[:k])) for k in ks}


@register("influence", "the K blocks with the lowest block influence (ShortGPT)")
def _influence(job: _Job, ks: list[int]) -> dict[int, Choice]:
    order = sorted(range(job.n), key=lambda i: (_finite(job.profile.blocks[i].block_influence, 1e9), i))
    return {k: Choice(sorted(order[:k])) for k in ks}


@register("angular", "the contiguous span of K blocks with the least angular distance (Gromov et al.)")
def _angular(job: _Job, ks: list[int]) -> dict[int, Choice]:
    starts = {k: _angular_spans(job, k, 1, allow_zero=True)[0] for k in ks}
    return {k: Choice(list(range(starts[k], starts[k] + k))) for k in ks}


def _angular_spans(job: _Job, k: int, count: int, allow_zero: bool) -> list[int]:
    """Starts of the `count` spans of length k with the least angular distance."""
    distances = {s.start: s.angular_distance for s in job.profile.spans if s.length == k}
    if not distances:
        raise InvalidPlanError(f"the profile has no spans of length {k}: calibrate with a larger spans_max")
    starts = [s for s in distances if allow_zero or s > 0]
    return sorted(starts, key=lambda s: (_finite(distances[s], 1e9), s))[:count]


def _finite(value, default: float = -1e9) -> float:
    return default if value is None or math.isnan(value) else float(value)


# --- measured strategies ---------------------------------------------------------------------

@register("greedy", "K rounds removing the block that raises held-out loss least (SLEB)",
          measured=True, needs_profile=False)
def _greedy(job: _Job, ks: list[int]) -> dict[int, Choice]:
    scorer, removed, trace, out = job.scorer, set(), [], {}
    for round_ in range(1, max(ks) + 1):
        kept = [i for i in range(job.n) if i not in removed]
        states = scorer.capture(removed, None, kept)
        losses = {}
        for c in kept:
            after = removed | {c}
            losses[c] = scorer.loss_from(after, None, _next_kept(c, after, job.n), states[f"h{c}"])
        best = min(losses, key=lambda c: (losses[c], c))
        removed.add(best)
        trace.append({"round": round_, "removed": best, "loss": round(losses[best], 5), "evaluated": len(losses)})
        log.info("greedy round %d: removed block %d (held-out loss %.4f)", round_, best, losses[best])
        if round_ in ks:
            out[round_] = Choice(sorted(removed), details={"rounds": list(trace)}, cost=job.cost_so_far())
    return out


@register("auto", "greedy search scoring each candidate with its linear replacement applied, "
          "against the best angular spans; keeps the lowest held-out loss", measured=True)
def _auto(job: _Job, ks: list[int]) -> dict[int, Choice]:
    """Ours. Two kinds of candidate plan, both measured on held-out windows with maps fitted on the rest:

    1. Greedy with the fold in the loop: each round, removing block c means folding a map fitted
       from its kept predecessor p's MLP projection to c's output (composed with any map p holds),
       so runs grow one block at a time and several short runs compete with one long one. Round
       one measures the profile's shortlist (`first_round` blocks whose removal perturbs least);
       later rounds re-measure the best `candidates` so far plus the neighbours of the last
       removal (the candidates whose fit changed most).
    2. The `spans` contiguous spans of length K with the least angular distance, each folded.
    The lower held-out loss wins; then both replacement forms (the ReplaceMe map, and the refitted
    projection) are fitted for the winner and the lower held-out loss again decides. Where maps
    cannot be folded, the same search runs with plain removals.
    """
    base = job.scorer.loss()
    out = {}
    for k, greedy in _greedy_with_fold(job, ks).items():
        options = [greedy] + (_measured_spans(job, k) if job.settings.spans > 0 else [])
        best = min(options, key=lambda o: o["loss"])
        details = {"held_out_loss_unpruned": round(base, 5), "held_out_loss": round(best["loss"], 5),
                   "chosen": best["kind"],
                   "considered": [{"kind": o["kind"], "drop": o["drop"], "spans": o["spans"],
                                   "loss": round(o["loss"], 5)} for o in options],
                   "rounds": greedy["rounds"]}
        form = None
        if best["spans"]:
            form, losses = _choose_form(job, best["drop"], best["spans"])
            details |= {"form": form, "held_out_loss_by_form": {f: round(v, 5) for f, v in losses.items()},
                        "held_out_loss": round(losses[form], 5)}
        if not job.fold:
            details["note"] = _no_fold_note(job)
        out[k] = Choice(best["drop"], best["spans"], details, cost=job.cost_so_far(), form=form)
    return out


def _choose_form(job: _Job, drop: list[int], spans: list[tuple[int, int]]) -> tuple[str, dict[str, float]]:
    """Fit each replacement form on the fit windows; keep the one with the lower held-out loss."""
    fit_ids, fit_mask = job.part("search")
    losses = {}
    for form in FORMS:
        fits = fit_spans(job.model, fit_ids, drop, spans, replace(job.settings.fit, form=form), fit_mask)
        losses[form] = job.scorer.loss(drop, {f.start - 1: f.replacement for f in fits})
    return min(losses, key=lambda f: (losses[f], f)), losses


def _greedy_with_fold(job: _Job, ks: list[int]) -> dict[int, dict]:
    s, scorer, n = job.settings, job.scorer, job.n
    fit_ids, fit_mask = job.part("search")
    removed: set[int] = set()
    maps: dict[int, torch.Tensor] = {}        # kept block -> map folded into its projection
    span_end: dict[int, int] = {}             # kept block -> end of the span its map replaces
    measured: dict[int, float] = {}           # block -> last measured loss after removing it
    last, rounds, out = None, [], {}
    for round_ in range(1, max(ks) + 1):
        kept = [i for i in range(n) if i not in removed]
        candidates = _round_candidates(job, kept, measured, last)
        prev = {c: (kept[kept.index(c) - 1] if kept.index(c) > 0 else None) for c in candidates}
        pairs = [(prev[c], c) for c in candidates if job.fold and prev[c] is not None]
        eqs = accumulate(job.model, fit_ids, pairs, s.fit, fit_mask, removed, maps,
                         description=f"auto round {round_}: fitting") if pairs else {}
        states = scorer.capture(removed, maps, candidates, {p for p, _ in pairs})
        results = []
        for c in candidates:
            after = removed | {c}
            nxt = _next_kept(c, after, n)
            if (prev[c], c) in eqs:
                T = eqs[(prev[c], c)].solve(s.fit.ridge)
                moved = [apply_map(h, m, T) for h, m in zip(states[f"h{c}"], states[f"m{prev[c]}"])]
                results.append((scorer.loss_from(after, maps, nxt, moved), c, T))
            else:
                results.append((scorer.loss_from(after, maps, nxt, states[f"h{c}"]), c, None))
            measured[c] = results[-1][0]
        loss, best, T = min(results, key=lambda r: (r[0], r[1]))
        p = prev[best]
        end = span_end.pop(best, best + 1)
        maps.pop(best, None)
        if T is not None:
            maps[p] = T if p not in maps else maps[p] @ T
            span_end[p] = end
        removed.add(best)
        measured.pop(best, None)
        last = best
        rounds.append({"round": round_, "removed": best, "linear": T is not None, "loss": round(loss, 5),
                       "evaluated": len(results)})
        log.info("auto round %d: removed block %d%s (held-out loss %.4f, %d candidates)", round_, best,
                 " with a linear map" if T is not None else "", loss, len(results))
        if round_ in ks:
            out[round_] = {"kind": "greedy with linear maps" if job.fold else "greedy", "drop": sorted(removed),
                           "spans": sorted((q + 1, e) for q, e in span_end.items()), "loss": loss,
                           "rounds": list(rounds)}
    return out


def _round_candidates(job: _Job, kept: list[int], measured: dict[int, float], last: int | None) -> list[int]:
    s = job.settings
    if last is None:
        return _profile_shortlist(job, kept, s.first_round)
    ranked = sorted((c for c in measured if c in kept), key=lambda c: (measured[c], c))[: s.candidates]
    i = kept.index(next((c for c in kept if c > last), kept[-1]))
    neighbours = {kept[j] for j in (i - 1, i) if 0 <= j < len(kept)}
    return sorted(set(ranked) | neighbours)


def _profile_shortlist(job: _Job, kept: list[int], count: int) -> list[int]:
    """Blocks whose removal perturbs the residual stream least, by the profile: the mean of the
    ranks by block influence and by relative contribution (block 0 only when it can be dropped)."""
    if count <= 0 or count >= len(kept):
        return list(kept)
    blocks = job.profile.blocks
    pool = [i for i in kept if i > 0 or not job.fold]
    by_influence = sorted(pool, key=lambda i: (_finite(blocks[i].block_influence, 1e9), i))
    by_contribution = sorted(pool, key=lambda i: (_finite(blocks[i].relative_contribution, 1e9), i))
    rank = {i: by_influence.index(i) + by_contribution.index(i) for i in pool}
    return sorted(sorted(pool, key=lambda i: (rank[i], i))[:count])


def _measured_spans(job: _Job, k: int) -> list[dict]:
    """The least-angular contiguous spans of length k, each with its map, measured as a whole."""
    starts = [st for st in _angular_spans(job, k, job.settings.spans, allow_zero=not job.fold) if st + k <= job.n]
    fit_ids, fit_mask = job.part("search")
    pairs = [(st - 1, st + k - 1) for st in starts if job.fold and st > 0]
    eqs = accumulate(job.model, fit_ids, pairs, job.settings.fit, fit_mask,
                     description="auto: fitting span maps") if pairs else {}
    inputs = set(starts)
    states = job.scorer.capture((), None, inputs, {p for p, _ in pairs})
    options = []
    for st in starts:
        drop = set(range(st, st + k))
        nxt = _next_kept(st, drop, job.n)
        if (st - 1, st + k - 1) in eqs:
            T = eqs[(st - 1, st + k - 1)].solve(job.settings.fit.ridge)
            moved = [apply_map(h, m, T) for h, m in zip(states[f"h{st}"], states[f"m{st - 1}"])]
            loss, spans = job.scorer.loss_from(drop, None, nxt, moved), [(st, st + k)]
        else:
            loss, spans = job.scorer.loss_from(drop, None, nxt, states[f"h{st}"]), []
        options.append({"kind": "angular span" + (" with a linear map" if spans else ""),
                        "drop": sorted(drop), "spans": spans, "loss": loss})
    return options


def _next_kept(block: int, removed: set[int], n: int) -> int | None:
    return next((i for i in range(block + 1, n) if i not in removed), None)


def _no_fold_note(job: _Job) -> str:
    if job.fold_refusal:
        return (f"linear replacement is not possible for {job.model.config.model_type} ({job.fold_refusal}): "
                "blocks are removed without it")
    return "linear replacement turned off: blocks are removed without it"


# --- the plan --------------------------------------------------------------------------------

def check_k(model, ks) -> None:
    """Refuse numbers of blocks to remove that the model cannot lose."""
    n = get_adapter(model).num_blocks(model)
    ks = [ks] if isinstance(ks, int) else list(ks)
    bad = [k for k in ks if not 1 <= k < n]
    if bad or not ks:
        raise InvalidPlanError(f"cannot remove {bad[0] if bad else 'no'} of {n} blocks: "
                               f"choose a number from 1 to {n - 1}")


def make_plan(model, windows: torch.Tensor, k: int, strategy: str = "auto", profile=None,
              settings: SelectSettings | None = None, attention_mask: torch.Tensor | None = None,
              linear: bool | None = None) -> Plan:
    """Choose K blocks with `strategy` and fit the linear maps; returns a Plan (maps included)."""
    settings = settings or SelectSettings()
    linear = settings.linear if linear is None else linear
    return make_plans(model, windows, [k], strategy, profile, settings, attention_mask, (linear,))[(k, linear)]


def make_plans(model, windows: torch.Tensor, ks: list[int], strategy: str = "auto", profile=None,
               settings: SelectSettings | None = None, attention_mask: torch.Tensor | None = None,
               variants: tuple[bool, ...] = (True,)) -> dict[tuple[int, bool], Plan]:
    """Plans for several K at once, with linear replacement (True) and/or without (False).

    Measured strategies search once, to the largest K. Baselines choose blocks once and only the
    fitting differs between variants; `auto` searches separately with and without maps.
    """
    found = search_plans(model, windows, ks, strategy, profile, settings, attention_mask, variants)
    return {key: finish() for key, finish in found.items()}


def search_plans(model, windows: torch.Tensor, ks: list[int], strategy: str = "auto", profile=None,
                 settings: SelectSettings | None = None, attention_mask: torch.Tensor | None = None,
                 variants: tuple[bool, ...] = (True,)) -> dict[tuple[int, bool], Callable[[], Plan]]:
    """Like `make_plans`, but only the search runs now: each value fits its plan's maps when called,
    so a caller that tries K = 1, 2, ... in turn pays for the fits of the plans it looks at."""
    settings = settings or SelectSettings()
    chosen = get_strategy(strategy)
    windows = torch.as_tensor(windows)
    check_k(model, ks)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise InvalidPlanError("calibration windows must be a non-empty [samples, seq_len] tensor")
    ks = sorted(set(ks))
    found, choices = {}, None
    for linear in variants:
        job = _Job(model, windows, attention_mask, profile, replace(settings, linear=linear))
        if chosen.needs_profile:
            profile = job.profile  # computed once, shared by the next variant
        if choices is None or strategy == "auto":
            status(f"choosing {ranges_text(ks)} blocks ({strategy}{'' if linear else ', no linear maps'})")
            choices = chosen.run(job, ks)
        for k in ks:
            found[(k, linear)] = _finisher(job, strategy, choices[k])
    return found


def _finisher(job: _Job, strategy: str, choice: Choice) -> Callable[[], Plan]:
    return lambda: _finish(job, strategy, copy.deepcopy(choice))


def _finish(job: _Job, strategy: str, choice: Choice) -> Plan:
    """Fit the chosen spans on all calibration windows and write down what was done."""
    settings, model, windows = job.settings, job.model, job.windows
    spans = choice.spans
    notes = [choice.details.pop("note")] if "note" in choice.details else []
    if not job.fold:
        spans = []
        if settings.linear and not notes:
            notes.append(_no_fold_note(job))
    elif spans is None:
        spans = [(s, e) for s, e in runs(choice.drop) if s > 0]
        if any(s == 0 for s, _ in runs(choice.drop)):
            notes.append("the run starting at block 0 is removed without a linear map "
                         "(there is no earlier MLP projection to fold it into)")
    fit = replace(settings.fit, form=choice.form) if choice.form else settings.fit
    fit_start = time.perf_counter()
    fits = fit_spans(model, windows, choice.drop, spans, fit, job.mask) if spans else []
    fit_seconds = time.perf_counter() - fit_start
    cost = {"profile_seconds": round(job.profile_seconds, 2), "select_seconds": 0.0, "loss_evaluations": 0,
            **choice.cost, "fit_seconds": round(fit_seconds, 2)}
    cost["seconds"] = round(cost["profile_seconds"] + cost["select_seconds"] + fit_seconds, 2)
    provenance = {
        "model_type": model.config.model_type,
        "windows": {"samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                    "fingerprint": _fingerprint(windows, job.mask)},
        "fit": fit_provenance(fit, fits),
        **({"note": " ".join(notes)} if notes else {}),
        **({"search": choice.details} if choice.details else {}),
    }
    if get_strategy(strategy).measured:
        provenance["held_out_windows"] = int(job.score_index.numel())
    return Plan.from_fits(strategy, job.n, choice.drop, fits, provenance, cost)


def _fingerprint(windows, mask) -> str:
    from compressor.calibrate.data import windows_fingerprint

    return windows_fingerprint(windows, mask)
