"""What a selection strategy receives and returns, and the registry that names strategies.

A strategy is a plain function `fn(context: SelectContext, ks: list[int]) -> dict[int, Choice]` (or a
`Deferred`, which makes each K's choice when it is first looked up), registered with
`@register(name, description, ...)`. One call serves every K asked for, so a measured strategy searches
once, to the largest K, and keeps the choice of each round asked for.
`compressor.select.plan_blocks` runs a strategy and fits the linear maps of what it chose.

    from compressor.select import Choice, SelectContext, register

    @register("every-other", "every second block from the middle on")
    def every_other(context: SelectContext, ks: list[int]) -> dict[int, Choice]:
        middle = context.num_blocks // 2
        return {k: Choice(list(range(middle, context.num_blocks, 2))[:k]) for k in ks}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from compressor.adapters import Adapter, get_adapter
from compressor.errors import InvalidPlanError
from compressor.select.maps import FitSettings
from compressor.select.scoring import Scorer


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


class Deferred(Mapping):
    """depth -> Choice, each made by `make(k)` when first looked up (a strategy's per-depth work that a caller
    may never need); iterates over the depths searched."""

    def __init__(self, ks, make: Callable[[int], Choice]):
        self._ks, self._make, self._made = sorted(ks), make, {}

    def __getitem__(self, k: int) -> Choice:
        if k not in self._ks:
            raise KeyError(k)
        if k not in self._made:
            self._made[k] = self._make(k)
        return self._made[k]

    def __iter__(self):
        return iter(self._ks)

    def __len__(self) -> int:
        return len(self._ks)


@dataclass
class SelectContext:
    """Everything one selection run shares, handed to the strategy.

    model, windows [N, T], attention_mask: the calibration data (the model is not modified);
    profile: the calibration profile (None only for strategies registered with needs_profile=False);
    settings: the selection settings; memo: shared by the searches of one run (`plan_blocks`'s memo).
    Derived: the adapter, num_blocks, fold_refusal (why this architecture cannot hold a linear map, or
    None), and the split of the windows into the held-out ones losses are measured on (score_index,
    every len/held-th window) and the rest (fit_index).
    """

    model: torch.nn.Module
    windows: torch.Tensor
    attention_mask: torch.Tensor | None
    profile: object | None
    settings: SelectSettings
    memo: dict = field(default_factory=dict)  # what a strategy keeps for later searches of the same model,
                                              # windows and settings (auto: its greedy rounds)
    adapter: Adapter = field(init=False)
    num_blocks: int = field(init=False)
    fold_refusal: str | None = field(init=False)
    score_index: torch.Tensor = field(init=False)
    fit_index: torch.Tensor = field(init=False)
    started: float = field(init=False, default_factory=time.perf_counter)
    _scorer: Scorer | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.adapter = get_adapter(self.model)
        self.num_blocks = self.adapter.num_blocks(self.model)
        self.fold_refusal = self.adapter.why_no_fold(self.model.config)
        n_windows = self.windows.shape[0]
        held = max(1, min(self.settings.score_windows, n_windows // 4))
        step = max(1, n_windows // held)
        score = torch.arange(step - 1, n_windows, step)[:held]
        held_out = set(score.tolist())
        self.score_index = score
        self.fit_index = torch.tensor([i for i in range(n_windows) if i not in held_out] or sorted(held_out))

    @property
    def fold(self) -> bool:
        """Whether removed spans get linear maps: asked for, and the architecture can hold them."""
        return self.settings.linear and self.fold_refusal is None

    @property
    def scorer(self) -> Scorer:
        """Loss on the held-out windows, for the model as a candidate plan would leave it."""
        if self._scorer is None:
            mask = None if self.attention_mask is None else self.attention_mask[self.score_index]
            self._scorer = Scorer(self.model, self.windows[self.score_index], mask, self.settings.batch_size)
        return self._scorer

    def cost_so_far(self) -> dict:
        scorer = self._scorer
        return {"select_seconds": round(time.perf_counter() - self.started, 2),
                "loss_evaluations": scorer.evaluations if scorer else 0}

    def part(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The windows (and mask) of "fit", "search" (the fit windows auto searches with) or "score"."""
        index = self.fit_index if which != "score" else self.score_index
        cap = self.settings.search_windows
        if which == "search" and cap and cap < index.numel():
            index = index[torch.linspace(0, index.numel() - 1, cap).round().long()]
        return self.windows[index], (None if self.attention_mask is None else self.attention_mask[index])

    def no_fold_note(self) -> str:
        if self.fold_refusal:
            return (f"linear replacement is not possible for {self.model.config.model_type} "
                    f"({self.fold_refusal}): blocks are removed without it")
        return "linear replacement turned off: blocks are removed without it"


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[SelectContext, list[int]], Mapping[int, Choice]]
    description: str
    measured: bool = False        # it measures losses (its plans carry loss evaluations and held-out windows)
    needs_profile: bool = True    # it reads context.profile (plan_blocks refuses to run it without one)
    uses_maps: bool = False       # its choice depends on settings.linear (searched again with it off)


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, description: str, measured: bool = False, needs_profile: bool = True,
             uses_maps: bool = False):
    """Decorator: add a strategy `fn(context, ks) -> {k: Choice}` to the registry under `name`."""
    def wrap(fn):
        STRATEGIES[name] = Strategy(name, fn, description, measured, needs_profile, uses_maps)
        return fn

    return wrap


def finite(value, default: float = -1e9) -> float:
    """A metric as a float for sorting, `default` where it is missing or NaN."""
    return default if value is None or math.isnan(value) else float(value)


def angular_spans(context: SelectContext, k: int, count: int, allow_zero: bool) -> list[int]:
    """Starts of the `count` spans of length k with the least angular distance."""
    distances = {s.start: s.angular_distance for s in context.profile.spans if s.length == k}
    if not distances:
        raise InvalidPlanError(f"the profile has no spans of length {k}: calibrate with a larger spans_max")
    starts = [s for s in distances if allow_zero or s > 0]
    return sorted(starts, key=lambda s: (finite(distances[s], 1e9), s))[:count]
