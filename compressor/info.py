"""What a model is: architecture, depth, width, parameters, dtype, size."""

from __future__ import annotations

from pathlib import Path

from compressor.adapters import get_adapter
from compressor.util.io import dir_size


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_info(model, source: str | Path | None = None) -> dict:
    adapter = get_adapter(model)
    config = model.config
    blocks = adapter.blocks_of(model)
    block_params = sum(p.numel() for p in blocks.parameters())
    total = count_parameters(model)
    record = getattr(config, "compressor", None) or {}
    info = {
        "architecture": config.model_type,
        "class": type(model).__name__,
        "blocks": len(blocks),
        "blocks_original": record.get("blocks_original", len(blocks)),
        "removed": record.get("removed", []),
        "hidden_size": config.get_text_config().hidden_size,
        "vocab_size": config.get_text_config().vocab_size,
        "parameters": total,
        "block_parameters": block_params,
        "other_parameters": total - block_params,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "residual": adapter.residual,
        "norm": adapter.norm,
        "foldable": adapter.why_no_fold(config) is None,
    }
    if source is not None and Path(source).exists():
        info["source"] = str(source)
        info["size_bytes"] = dir_size(source)
    return info
