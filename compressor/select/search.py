"""Choosing which K blocks to remove, and fitting the linear maps that replace removed spans.

One entry point:

    from compressor.calibrate import calibrate
    from compressor.select import plan_blocks
    plans = plan_blocks(model, windows, [2, 4], "auto", profile=calibrate(model, windows))
    plans[4]   # the Plan removing 4 blocks; its maps are fitted the first time it is asked for

Strategies are registered by name in `STRATEGIES` (see `compressor.select.registry` for the extension
signature, `compressor.select.strategies` for the baselines and `compressor.select.auto` for ours). Strategies
that read the calibration profile refuse to run without one: calibrating is a separate,
cacheable step (`compressor.calibrate.calibrate` or `profile_for`), never done behind the caller's back.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import torch

import compressor.select.auto
import compressor.select.strategies  # noqa: F401  (registers the baselines)
from compressor.adapters import get_adapter
from compressor.blocks import ranges_text, runs
from compressor.errors import InvalidPlanError
from compressor.select.maps import fit_provenance, fit_spans
from compressor.select.registry import STRATEGIES, Choice, SelectContext, SelectSettings, Strategy, register
from compressor.surgery.plan import Plan
from compressor.util.fingerprint import windows_fingerprint
from compressor.util.progress import status

__all__ = ["STRATEGIES", "Choice", "PlanSearch", "SelectContext", "SelectSettings", "Strategy", "check_k",
           "get_strategy", "plan_blocks", "register"]


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidPlanError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}") from None


def check_k(model, ks) -> None:
    """Refuse numbers of blocks to remove that the model cannot lose."""
    n = get_adapter(model).num_blocks(model)
    ks = [ks] if isinstance(ks, int) else list(ks)
    bad = [k for k in ks if not 1 <= k < n]
    if bad or not ks:
        raise InvalidPlanError(f"cannot remove {bad[0] if bad else 'no'} of {n} blocks: "
                               f"choose a number from 1 to {n - 1}")


class PlanSearch(Mapping[int, Plan]):
    """The plans one selection run found, by number of blocks removed.

    The search has run; a plan's maps are fitted (on all calibration windows) the first time it is
    looked up, so a caller that tries K = 1, 2, ... in turn pays only for the fits it looks at.
    """

    def __init__(self, context: SelectContext, strategy: Strategy, choices: dict[int, Choice]):
        self.context, self.strategy, self.choices = context, strategy, choices
        self._plans: dict[int, Plan] = {}

    def __getitem__(self, k: int) -> Plan:
        if k not in self._plans:
            if k not in self.choices:
                raise KeyError(k)
            self._plans[k] = _fit_plan(self.context, self.strategy, copy.deepcopy(self.choices[k]))
        return self._plans[k]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.choices))

    def __len__(self) -> int:
        return len(self.choices)

    def with_linear(self, linear: bool) -> PlanSearch:
        """The same search with linear replacement on or off. Strategies whose choice does not depend
        on it keep their choices (only the fits differ); `auto` searches again."""
        if linear == self.context.settings.linear:
            return self
        old = self.context
        context = SelectContext(old.model, old.windows, old.attention_mask, old.profile,
                                replace(old.settings, linear=linear))
        if not self.strategy.uses_maps:
            return PlanSearch(context, self.strategy, self.choices)
        return _search(context, self.strategy, sorted(self.choices))


def plan_blocks(model, windows: torch.Tensor, ks: int | Iterable[int], strategy: str = "auto", *,
                profile=None, settings: SelectSettings | None = None,
                attention_mask: torch.Tensor | None = None, memo: dict | None = None) -> PlanSearch:
    """Choose blocks to remove with `strategy` for each K in `ks` (one search serves them all).

    windows [N, T]: calibration token ids (attention_mask [N, T], 0 at padding); profile: the
    calibration profile of the model on them, required by every strategy but `greedy`;
    settings.linear (default on) replaces removed spans by fitted linear maps where possible.
    memo: a dict kept by the caller across searches of this model, windows, strategy and settings: a
    later search for other depths resumes from what an earlier one found (auto's greedy rounds).
    """
    settings = settings or SelectSettings()
    chosen = get_strategy(strategy)
    windows = torch.as_tensor(windows)
    ks = sorted({ks} if isinstance(ks, int) else set(ks))
    check_k(model, ks)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise InvalidPlanError("calibration windows must be a non-empty [samples, seq_len] tensor")
    if chosen.needs_profile and profile is None:
        raise InvalidPlanError(
            f"strategy '{strategy}' reads the calibration profile and none was given: pass "
            "profile=compressor.calibrate.calibrate(model, windows) (or profile_for(...), which caches it)")
    memo = {} if memo is None else memo.setdefault((strategy, repr(settings)), {})
    return _search(SelectContext(model, windows, attention_mask, profile, settings, memo), chosen, ks)


def _search(context: SelectContext, strategy: Strategy, ks: list[int]) -> PlanSearch:
    linear = "" if context.settings.linear else ", no linear maps"
    status(f"choosing {ranges_text(ks)} blocks ({strategy.name}{linear})")
    return PlanSearch(context, strategy, strategy.run(context, ks))


def _fit_plan(context: SelectContext, strategy: Strategy, choice: Choice) -> Plan:
    """Fit the chosen spans on all calibration windows and write down what was done."""
    settings, model, windows = context.settings, context.model, context.windows
    spans = choice.spans
    notes = [choice.details.pop("note")] if "note" in choice.details else []
    if not context.fold:
        spans = []
        if settings.linear and not notes:
            notes.append(context.no_fold_note())
    elif spans is None:
        spans = [(s, e) for s, e in runs(choice.drop) if s > 0]
        if any(s == 0 for s, _ in runs(choice.drop)):
            notes.append("the run starting at block 0 is removed without a linear map "
                         "(there is no earlier MLP projection to fold it into)")
    fit = replace(settings.fit, form=choice.form) if choice.form else settings.fit
    fit_start = time.perf_counter()
    fits = fit_spans(model, windows, choice.drop, spans, fit, context.attention_mask) if spans else []
    fit_seconds = time.perf_counter() - fit_start
    cost = {"profile_seconds": 0.0, "select_seconds": 0.0, "loss_evaluations": 0,
            **choice.cost, "fit_seconds": round(fit_seconds, 2)}
    cost["seconds"] = round(cost["profile_seconds"] + cost["select_seconds"] + fit_seconds, 2)
    provenance = {
        "model_type": model.config.model_type,
        "windows": {"samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                    "fingerprint": windows_fingerprint(windows, context.attention_mask)},
        "fit": fit_provenance(fit, fits),
        **({"note": " ".join(notes)} if notes else {}),
        **({"search": choice.details} if choice.details else {}),
    }
    if strategy.measured:
        provenance["held_out_windows"] = int(context.score_index.numel())
    return Plan.from_fits(strategy.name, context.num_blocks, choice.drop, fits, provenance, cost)


