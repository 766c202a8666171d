"""Short content hashes that key caches and record provenance: one for a model, one for token windows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def model_fingerprint(model) -> str:
    """A short hash that changes when the model's config or weights change.

    A checkpoint directory: its config.json plus name, size and mtime of each weight file.
    A loaded model: its config plus, per parameter, name, shape, dtype, sum and sum of squares
    (every weight is read once; hashing every byte of a 70B model would take minutes).
    """
    digest = hashlib.sha256()
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        path = Path(model)
        if (path / "config.json").is_file():
            digest.update((path / "config.json").read_bytes())
        for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(str(content_signature(file)).encode())
    elif isinstance(model, (str, Path)) and Path(model).is_file():  # a .gguf file
        digest.update(f"{Path(model).resolve()}:{content_signature(Path(model))}".encode())
    elif isinstance(model, (str, Path)):
        digest.update(str(model).encode())
    else:
        digest.update(model.config.to_json_string(use_diff=False).encode())
        with torch.no_grad():
            for name, p in model.named_parameters():
                q = p.detach().to(torch.float64)
                digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{q.sum().item():.17g}:"
                              f"{q.square().sum().item():.17g}".encode())
    return digest.hexdigest()[:20]


def content_signature(path: Path) -> list | None:
    """[name, size, mtime_ns] of a file, or of every file under a directory; None where nothing is there.
    What changes when a file is edited, without reading it."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if path.is_dir():
        return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                for f in sorted(path.rglob("*")) if f.is_file()]
    return None


def windows_fingerprint(windows: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str:
    """A hash of exactly the tokens (and mask) a pass sees."""
    digest = hashlib.sha256(windows.to(torch.int64).cpu().contiguous().numpy().tobytes())
    digest.update(str(tuple(windows.shape)).encode())
    if attention_mask is not None:
        digest.update(attention_mask.to(torch.int8).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]
