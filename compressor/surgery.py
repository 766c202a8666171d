"""Model surgery: the one module that deletes blocks, folds maps into weights and fixes configs.

Every transform here mutates the model in place (trailing underscore) and leaves a model that
`save_pretrained`s to a standard checkpoint: fewer blocks, renumbered cache indices, per-layer
config lists sliced, and a `compressor` record in the config that transformers ignores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from compressor.adapters import get_adapter
from compressor.errors import InvalidPlanError

log = logging.getLogger(__name__)


def parse_blocks(spec: str | Iterable[int], num_blocks: int) -> list[int]:
    """Parse "3,5-7" (ranges inclusive) into sorted indices, validating them against the depth."""
    if isinstance(spec, str):
        indices: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise InvalidPlanError(f"block range '{part}' is empty: write it low-high")
                    indices.extend(range(lo, hi + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise InvalidPlanError(f"cannot read block '{part}': use indices like 3,5-7") from None
    else:
        indices = [int(i) for i in spec]
    if not indices:
        raise InvalidPlanError("no blocks given: use indices like 3,5-7")
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise InvalidPlanError(f"block indices repeat: {dupes}")
    bad = [i for i in indices if not 0 <= i < num_blocks]
    if bad:
        raise InvalidPlanError(f"block indices {bad} are out of range: the model has blocks 0-{num_blocks - 1}")
    if len(indices) >= num_blocks:
        raise InvalidPlanError(f"cannot remove all {num_blocks} blocks: keep at least one")
    return sorted(indices)


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
