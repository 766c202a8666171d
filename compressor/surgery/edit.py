"""Model surgery: the one module that deletes blocks, folds maps into weights and fixes configs.

Every transform here mutates the model in place (trailing underscore) and leaves a model that
`save_pretrained`s to a standard checkpoint: fewer blocks, renumbered cache indices, per-layer
config lists sliced, and a `compressor` record in the config that transformers ignores.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable

import torch

from compressor.adapters import check_foldable, get_adapter
from compressor.blocks import parse_blocks
from compressor.errors import InvalidPlanError

log = logging.getLogger(__name__)


def compressor_record(model) -> dict:
    """What earlier surgery did, in original block numbering (a fresh record for an untouched model)."""
    record = getattr(model.config, "compressor", None)
    n = get_adapter(model).num_blocks(model)
    if not record:
        return {"blocks_original": n, "kept": list(range(n)), "removed": [], "linearized": []}
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


def drop_blocks_(model: torch.nn.Module, indices: Iterable[int], linearized: Iterable[dict] = ()) -> None:
    """Remove decoder blocks in place (indices in the model's current numbering)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    n = len(blocks)
    drop = parse_blocks(list(indices), n)
    record = compressor_record(model)
    keep = [i for i in range(n) if i not in set(drop)]

    new_blocks = torch.nn.ModuleList([blocks[i] for i in keep])
    parent_path, _, attr = adapter.blocks.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new_blocks)
    _renumber(new_blocks, adapter)
    _fix_config(model.config, adapter, keep, n)

    record["removed"] = sorted(record["removed"] + [record["kept"][i] for i in drop])
    record["linearized"] = record["linearized"] + [
        {"start": record["kept"][s["start"]], "end": record["kept"][s["end"] - 1] + 1} for s in linearized
    ]
    record["kept"] = [record["kept"][i] for i in keep]
    model.config.compressor = record
    log.info("removed blocks %s (now %d of %d)", drop, len(keep), record["blocks_original"])


drop_blocks = drop_blocks_  # the name used in the issue tracker; same function


def _renumber(blocks: torch.nn.ModuleList, adapter) -> None:
    for new_index, block in enumerate(blocks):
        for path in adapter.layer_idx:
            module = block.get_submodule(path) if path else block
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


def _fix_config(config, adapter, keep: list[int], n: int) -> None:
    configs = [config] + [c for c in (getattr(config, "text_config", None),) if c is not None]
    for cfg in configs:
        for name in adapter.layer_count:
            if hasattr(cfg, name):
                setattr(cfg, name, len(keep))
        for name in adapter.per_layer_lists + adapter.extra_lists:
            value = getattr(cfg, name, None)
            if isinstance(value, (list, tuple)) and len(value) == n:
                setattr(cfg, name, [value[i] for i in keep])


def save_checkpoint(model, tokenizer, out) -> None:
    """Write a standard Hugging Face checkpoint (safetensors) into an existing directory."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


# --- linear maps folded into existing weights (issue 4) ---------------------------------------

def _foldable_projection(model: torch.nn.Module, block_index: int, action: str) -> torch.nn.Module:
    """Block `block_index`'s MLP output projection, or a refusal naming why it cannot be changed."""
    check_foldable(model, f"{action} block {block_index}", "drop the blocks without a linear replacement instead")
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    if not 0 <= block_index < len(blocks):
        raise InvalidPlanError(f"block {block_index} is out of range: the model has blocks 0-{len(blocks) - 1}")
    return adapter.mlp_out_of(blocks[block_index])


def fold_linear_(model: torch.nn.Module, block_index: int, T: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Make block `block_index`'s MLP output projection return proj(x) @ T (+ bias), in place.

    nn.Linear (y = x W' + b): W <- T' W, b <- b T. GPT-2's Conv1D (y = x W + b): W <- W T.
    The product is taken in float64 and stored in the weight's dtype; no module or parameter is
    added, so the checkpoint stays standard. `bias` is only accepted where the projection has one.
    """
    proj = _foldable_projection(model, block_index, "fold a linear map into")
    weight = proj.weight
    T = torch.as_tensor(T).to(device=weight.device, dtype=torch.float64)
    out_features = weight.shape[0] if isinstance(proj, torch.nn.Linear) else weight.shape[1]
    if T.shape != (out_features, out_features):
        raise InvalidPlanError(f"map of shape {tuple(T.shape)} does not fit block {block_index}'s projection "
                               f"(width {out_features}): the plan was made for another model")
    has_bias = getattr(proj, "bias", None) is not None
    if bias is not None and not has_bias:
        raise InvalidPlanError(f"block {block_index}'s projection has no bias to fold a bias into")
    with torch.no_grad():
        w = weight.to(torch.float64)
        new = T.T @ w if isinstance(proj, torch.nn.Linear) else w @ T
        weight.copy_(new.to(weight.dtype))
        if has_bias:
            b = proj.bias.to(torch.float64) @ T
            if bias is not None:
                b = b + torch.as_tensor(bias).to(b)
            proj.bias.copy_(b.to(proj.bias.dtype))


def set_projection_(model: torch.nn.Module, block_index: int, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> None:
    """Replace block `block_index`'s MLP output projection by output = input @ weight (+ bias), in place.

    `weight` is [d_in, d_out] whatever the module's layout (nn.Linear stores its transpose, GPT-2's
    Conv1D stores it as is); values are cast to the module's dtype. Shapes must match: nothing is
    added to the model.
    """
    proj = _foldable_projection(model, block_index, "refit the MLP projection of")
    linear = isinstance(proj, torch.nn.Linear)
    weight = torch.as_tensor(weight)
    new = weight.T if linear else weight
    if new.shape != proj.weight.shape:
        raise InvalidPlanError(f"projection of shape {tuple(weight.shape)} does not fit block {block_index} "
                               "(the plan was made for another model)")
    has_bias = getattr(proj, "bias", None) is not None
    if bias is not None and not has_bias:
        raise InvalidPlanError(f"block {block_index}'s projection has no bias to set")
    with torch.no_grad():
        proj.weight.copy_(new.to(proj.weight))
        if bias is not None:
            proj.bias.copy_(torch.as_tensor(bias).reshape(proj.bias.shape).to(proj.bias))


def copy_without_blocks(model: torch.nn.Module, drop: Iterable[int] = (),
                        own: Iterable[torch.nn.Module] = ()) -> torch.nn.Module:
    """A new model: `model` with blocks `drop` (current numbering) removed, sharing its weights.

    No weight is copied except the parameters of the modules in `own`, which the caller means to
    change (a projection a map is folded into). The copy is for measuring: training it would
    change `model` too (`copy.deepcopy` for that). `blocks_removed` is the in-place, temporary
    form of the same removal, for forwards that need no second model.
    """
    owned = {id(p) for module in own for p in module.parameters()}
    shared = {id(p): p for p in model.parameters() if id(p) not in owned}
    clone = copy.deepcopy(model, memo=shared)
    drop = list(drop)
    if drop:
        drop_blocks_(clone, drop)
    return clone


@contextlib.contextmanager
def blocks_removed(model: torch.nn.Module, indices: Iterable[int]):
    """Remove blocks (current numbering) for the duration of a `with`; everything comes back after.

    Used to run a model as it would be after a plan, or to start a forward in the middle of the
    stack, without copying weights. The ModuleList, config fields and cache indices are restored
    in `finally`.
    """
    adapter = get_adapter(model)
    parent_path, _, attr = adapter.blocks.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    configs = [model.config] + [c for c in (getattr(model.config, "text_config", None),) if c is not None]
    names = adapter.layer_count + adapter.per_layer_lists + adapter.extra_lists
    saved = [{n: copy.deepcopy(getattr(c, n)) for n in names if hasattr(c, n)} for c in configs]
    drop = set(indices)
    keep = [i for i in range(len(blocks)) if i not in drop]
    if not keep or not drop <= set(range(len(blocks))):
        raise InvalidPlanError(f"cannot remove blocks {sorted(drop)} of {len(blocks)}")
    setattr(parent, attr, torch.nn.ModuleList([blocks[i] for i in keep]))
    _renumber(getattr(parent, attr), adapter)
    _fix_config(model.config, adapter, keep, len(blocks))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        _renumber(blocks, adapter)
        for cfg, values in zip(configs, saved):
            for name, value in values.items():
                setattr(cfg, name, value)
