"""A plan: what to remove from a model, and which removed spans a fitted linear map replaces.

A plan is data. `plan.json` holds the stable keys

    strategy          the selection strategy that made it
    blocks_original   the depth of the model it applies to (indices below are in that numbering)
    drop              every block the plan removes, sorted
    linearize         [{"start": s, "end": e, "form": f}]: spans of `drop` (end exclusive) whose work
                      a linear replacement does instead, held by block s - 1's MLP output projection:
                      form "map" folds a d x d map T into it (ReplaceMe), "projection" refits it
    maps              the safetensors file beside the plan holding the replacements, float32:
                      "span.s-e" = T [d, d]; "proj.s-e.weight" [d_in, d_out] (+ "proj.s-e.bias"),
                      with output = input @ weight + bias; null when nothing is linearized

plus `provenance` (data, settings, per-span fit details) and `cost` (seconds, loss evaluations).
Applying a plan needs no calibration data: fold every replacement first (numbering unchanged), then
remove all blocks with one `drop_blocks_` call, so the compressor record in the config names the spans.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.adapters import check_foldable, get_adapter
from compressor.blocks import ranges_text
from compressor.errors import InvalidPlanError
from compressor.surgery.edit import copy_without_blocks, drop_blocks_, fold_linear_, set_projection_
from compressor.util.io import atomic_file, write_json

log = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass
class Projection:
    """A refitted MLP output projection: output = input @ weight + bias (weight [d_in, d_out])."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float64) @ self.weight.to(x.device, torch.float64)
        return y if self.bias is None else y + self.bias.to(x.device, torch.float64)


Replacement = torch.Tensor | Projection  # a map T applied after the projection, or a new projection


@dataclass
class Plan:
    strategy: str
    blocks_original: int
    drop: list[int]
    linearize: list[dict] = field(default_factory=list)
    maps_file: str | None = None
    provenance: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.drop = sorted(int(i) for i in self.drop)
        self.linearize = sorted(({"start": int(s["start"]), "end": int(s["end"]), "form": str(s.get("form", "map"))}
                                 for s in self.linearize), key=lambda s: s["start"])

    @classmethod
    def from_fits(cls, strategy: str, blocks_original: int, drop, fits, provenance=None, cost=None) -> Plan:
        """A plan from `compressor.select.maps.SpanFit`s (their replacements become the maps)."""
        maps: dict[str, torch.Tensor] = {}
        for f in fits:
            if isinstance(f.replacement, Projection):
                maps[f"proj.{f.start}-{f.end}.weight"] = f.replacement.weight.to(torch.float32)
                if f.replacement.bias is not None:
                    maps[f"proj.{f.start}-{f.end}.bias"] = f.replacement.bias.to(torch.float32)
            else:
                maps[span_key(f.start, f.end)] = f.replacement.to(torch.float32)
        return cls(strategy, blocks_original, drop, [{"start": f.start, "end": f.end, "form": f.form} for f in fits],
                   provenance=dict(provenance or {}), cost=dict(cost or {}), maps=maps)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(s["start"], s["end"]) for s in self.linearize]

    def replacement(self, start: int, end: int):
        """The span's map T (a tensor) or refitted projection (`compressor.select.maps.Projection`)."""
        form = next(s["form"] for s in self.linearize if (s["start"], s["end"]) == (start, end))
        if form == "projection":
            return Projection(self.maps[f"proj.{start}-{end}.weight"], self.maps.get(f"proj.{start}-{end}.bias"))
        return self.maps[span_key(start, end)]

    @property
    def blocks_kept(self) -> int:
        return self.blocks_original - len(self.drop)

    def validate(self, num_blocks: int | None = None) -> None:
        """Raise InvalidPlanError naming every problem (checked against a model's depth if given)."""
        problems = []
        n = self.blocks_original
        if num_blocks is not None and num_blocks != n:
            problems.append(f"it was made for a model with {n} blocks, this one has {num_blocks}: "
                            "make a new plan for this model")
        if len(set(self.drop)) != len(self.drop):
            problems.append(f"drop repeats blocks: {self.drop}")
        if any(not 0 <= i < n for i in self.drop):
            problems.append(f"drop has indices outside 0-{n - 1}: {self.drop}")
        if len(self.drop) >= n:
            problems.append(f"it removes all {n} blocks")
        for span in self.linearize:
            s, e = span["start"], span["end"]
            if not set(range(s, e)) <= set(self.drop) or e <= s:
                problems.append(f"linearized span {s}-{e - 1} is not a run of dropped blocks")
            if s < 1 or (s - 1) in self.drop:
                problems.append(f"linearized span {s}-{e - 1} has no kept block before it to fold into")
            key = {"map": span_key(s, e), "projection": f"proj.{s}-{e}.weight"}.get(span["form"])
            if key is None:
                problems.append(f"span {s}-{e - 1} has an unknown form '{span['form']}' (map or projection)")
            elif key not in self.maps:
                problems.append(f"no map for span {s}-{e - 1} (is {self.maps_file or 'the maps file'} missing?)")
        if problems:
            raise InvalidPlanError("invalid plan: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION, "strategy": self.strategy, "blocks_original": self.blocks_original,
            "drop": self.drop, "linearize": self.linearize, "maps": self.maps_file,
            "blocks_kept": self.blocks_kept, "provenance": self.provenance, "cost": self.cost,
        }

    @classmethod
    def from_dict(cls, data: dict, maps: dict[str, torch.Tensor] | None = None) -> Plan:
        try:
            return cls(strategy=str(data["strategy"]), blocks_original=int(data["blocks_original"]),
                       drop=list(data["drop"]), linearize=list(data.get("linearize") or []),
                       maps_file=data.get("maps"), provenance=dict(data.get("provenance") or {}),
                       cost=dict(data.get("cost") or {}), maps=dict(maps or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPlanError(f"not a compressor plan (bad or missing key: {exc}): "
                                   "make one with `compress plan`") from None

    def summary(self) -> str:
        """A few lines for people."""
        kept = self.blocks_kept
        lines = [(f"plan ({self.strategy}): remove {len(self.drop)} of {self.blocks_original} blocks, "
                 f"keep {kept}; removed: {ranges_text(self.drop) or 'none'}")]
        linear = set().union(*(set(range(s, e)) for s, e in self.spans)) if self.spans else set()
        if self.spans:
            what = {"map": "map folded into", "projection": "refitted MLP projection of"}
            parts = [f"{ranges_text(range(s['start'], s['end']))} -> {what.get(s['form'], s['form'])} block {s['start'] - 1}"
                     for s in self.linearize]
            lines.append("linear replacement: " + "; ".join(parts))
        plain = [i for i in self.drop if i not in linear]
        if plain and self.spans:
            lines.append(f"dropped without replacement: {ranges_text(plain)}")
        loss = self.provenance.get("calibration_loss")
        if loss:
            lines.append(f"held-out calibration loss {loss['before']:.4f} -> {loss['after']:.4f}")
        if self.provenance.get("note"):
            lines.append(self.provenance["note"])
        if self.cost:
            evals = self.cost.get("loss_evaluations")
            lines.append(f"cost: {self.cost.get('seconds', 0):.1f} s"
                         + (f", {evals} loss evaluations" if evals is not None else ""))
        return "\n".join(lines)


def span_key(start: int, end: int) -> str:
    return f"span.{start}-{end}"


def write_plan(plan: Plan, path: Path | str, maps: dict[str, torch.Tensor] | None = None) -> Path:
    """Write plan.json, and the maps beside it (`<stem>.maps.safetensors`) when there are any."""
    from safetensors.torch import save_file

    path = Path(path)
    maps = plan.maps if maps is None else maps
    if maps:
        plan.maps = maps
        plan.maps_file = f"{path.stem}.maps.safetensors"
    else:
        plan.maps_file = None
    plan.validate()
    if maps:  # the maps first: a plan.json on disk always has its maps beside it
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in maps.items()}
        with atomic_file(path.with_name(plan.maps_file)) as tmp:
            save_file(tensors, tmp, metadata={"plan": path.name})
    write_json(path, plan.to_dict())
    return path


def read_plan(path: Path | str) -> Plan:
    """Read a plan.json (and the maps file it names, from the same directory)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidPlanError(f"{path} does not exist: make a plan with `compress plan MODEL --out {path.name}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidPlanError(f"{path} is not JSON ({exc}): pass a plan.json written by `compress plan`") from None
    if not isinstance(data, dict):
        raise InvalidPlanError(f"{path} is not a compressor plan: pass a plan.json written by `compress plan`")
    maps = {}
    if data.get("maps"):
        maps = _read_maps(path.parent / str(data["maps"]))
    plan = Plan.from_dict(data, maps)
    plan.validate()
    return plan


def _read_maps(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InvalidPlanError(f"the plan's maps file {path} is missing: keep it beside plan.json")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InvalidPlanError(f"cannot read the plan's maps file {path}: {exc}") from None


def applied_copy(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The model as `plan` leaves it, as a new model; `model` is untouched. Weights the plan does
    not change are shared (`surgery.copy_without_blocks`): measure it, do not train it."""
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    changed = [adapter.mlp_out_of(blocks[s - 1]) for s, _ in plan.spans]
    clone = copy_without_blocks(model, own=changed)
    apply_plan_(clone, plan)
    return clone


def apply_plan_(model: torch.nn.Module, plan: Plan) -> None:
    """Fold the plan's replacements into their projections, then remove its blocks (one drop), in place."""
    adapter = get_adapter(model)
    plan.validate(adapter.num_blocks(model))
    if plan.spans:
        check_foldable(model, "apply a plan with linear replacements", "make a plan with --no-linear")
    for s, e in plan.spans:
        replacement = plan.replacement(s, e)
        if isinstance(replacement, Projection):
            set_projection_(model, s - 1, replacement.weight, replacement.bias)
        else:
            fold_linear_(model, s - 1, replacement)
    drop_blocks_(model, plan.drop, linearized=[{"start": s, "end": e} for s, e in plan.spans])
    log.info("applied plan: %s", plan.summary().splitlines()[0])


