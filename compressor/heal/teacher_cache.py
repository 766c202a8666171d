"""What the teacher says about the training windows: live, or from a cache computed once.

The cache holds, for every position of every training window, the teacher's top-k log-probabilities
(at the training temperature) and their token ids, plus, when the hidden-state loss is on, the
teacher's block outputs at the cut points. It is computed in one streaming pass with only the teacher
in memory, written as safetensors under a key made of the teacher's fingerprint, the windows' hash and
the settings, and reused by every later run; healing then never holds two models' activations at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.errors import DataError
from compressor.heal.losses import capture_block_outputs, kd_loss, topk_kd_loss
from compressor.util.fingerprint import model_fingerprint, windows_fingerprint
from compressor.util.io import atomic_file
from compressor.util.progress import track

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


@dataclass
class TeacherTargets:
    """Teacher outputs for one batch: full logits (live) or top-k log-probabilities (cached)."""

    logits: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def kd(self, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.logits is not None:
            return kd_loss(student_logits, self.logits, temperature)
        return topk_kd_loss(student_logits, self.logprobs, self.indices, temperature)


def _autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    """The teacher's forward in `dtype` autocast (None: as it is). On SmolLM2 with AMX, bf16 runs the
    teacher 2.5x faster and moves its next-token distributions by KL 0.0007 nats on average, against
    distillation losses of 0.4 nats."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


class LiveTeacher:
    """Runs the teacher on each batch (no gradients); keeps only its logits and the hidden states asked for."""

    def __init__(self, model: torch.nn.Module, hidden_blocks: list[int] = (), dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.hidden_blocks = list(hidden_blocks)
        self.dtype = dtype

    @torch.no_grad()
    def targets(self, window_ids: torch.Tensor, input_ids: torch.Tensor) -> TeacherTargets:
        with capture_block_outputs(self.model, self.hidden_blocks) as hidden, _autocast(self.model, self.dtype):
            logits = self.model(input_ids=input_ids).logits.float()
            return TeacherTargets(logits=logits, hidden={b: h.float() for b, h in hidden.items()})


class CachedTeacher:
    """Reads a teacher cache file row by row (memory-mapped by safetensors, never loaded whole)."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        from safetensors import safe_open

        self.path = Path(path)
        self.device = device
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self.meta = self._file.metadata()
        self.hidden_blocks = json.loads(self.meta["hidden_blocks"])
        self.window_ids = self._file.get_tensor("window_ids")  # row i holds window window_ids[i]

    @property
    def complete(self) -> bool:
        return int(self.meta["covered"]) == int(self.meta["windows"])

    def _rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        view = self._file.get_slice(name)
        return torch.stack([view[int(i)] for i in rows]).to(self.device)

    def hidden_rows(self, block: int, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's output of `block` (bfloat16) for cache rows `rows`."""
        return self._rows(f"hidden.{block}", rows)

    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor) -> TeacherTargets:
        """Targets for cache rows `rows` (the training windows heal() uses are `window_ids` in row order)."""
        return TeacherTargets(
            logprobs=self._rows("logprobs", rows),
            indices=self._rows("indices", rows),
            hidden={b: self._rows(f"hidden.{b}", rows) for b in self.hidden_blocks},
        )


def cache_key(fingerprint: str, windows_digest: str, topk: int, temperature: float, hidden_blocks,
              dtype: torch.dtype | None = None) -> str:
    spec = [CACHE_VERSION, fingerprint, windows_digest, int(topk), float(temperature), sorted(hidden_blocks)]
    if dtype is not None:  # a teacher run in autocast gives (slightly) other targets
        spec.append(str(dtype))
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:24]


MAX_CACHE_GB = 8.0  # the folder's cap (COMPRESSOR_TEACHER_CACHE_GB overrides it): least recently used go first
PATTERN = "teacher-*.safetensors"


def cache_limit_bytes() -> int:
    return int(float(os.environ.get("COMPRESSOR_TEACHER_CACHE_GB", MAX_CACHE_GB)) * 1e9)


def evict(directory: Path, keep: Path | None = None, max_bytes: int | None = None) -> list[Path]:
    """Delete the least recently used teacher caches in `directory` until it holds at most `max_bytes`
    (default: cache_limit_bytes()); `keep` (the cache in use) is never deleted. Returns what went."""
    max_bytes = cache_limit_bytes() if max_bytes is None else max_bytes
    files = sorted(Path(directory).glob(PATTERN), key=lambda f: f.stat().st_mtime)
    total = sum(f.stat().st_size for f in files)
    gone = []
    for f in files:
        if total <= max_bytes:
            break
        if keep is not None and f.resolve() == Path(keep).resolve():
            continue
        total -= f.stat().st_size
        f.unlink(missing_ok=True)
        gone.append(f)
    if gone:
        log.info("teacher cache over %.1f GB: removed %d least recently used file(s)", max_bytes / 1e9, len(gone))
    return gone


def clear_cache(directory: Path | None = None) -> int:
    """Delete every teacher cache in `directory` (default: compressor's own); returns how many."""
    from compressor.util.io import cache_dir

    files = list(Path(directory or cache_dir("teacher-logits")).glob(PATTERN))
    for f in files:
        f.unlink(missing_ok=True)
    return len(files)


def cache_path(directory: Path, teacher: torch.nn.Module, windows: torch.Tensor, topk: int, temperature: float,
               hidden_blocks=(), dtype: torch.dtype | None = None) -> Path:
    key = cache_key(model_fingerprint(teacher), windows_fingerprint(windows), topk, temperature, hidden_blocks, dtype)
    return Path(directory) / f"teacher-{key}.safetensors"


@torch.no_grad()
def build_cache(teacher: torch.nn.Module, windows: torch.Tensor, path: Path, topk: int, temperature: float,
                hidden_blocks=(), batch_size: int = 4, deadline: float | None = None, seed: int = 0,
                dtype: torch.dtype | None = None) -> Path:
    """Stream the teacher over `windows` once and write its top-k log-probabilities (and hidden states).

    With a `deadline` (time.monotonic() seconds) the pass visits windows in a seeded random order
    and stops there: the cache then covers a random subset, recorded in its `window_ids` tensor, and
    training uses just those windows. Without one, or when it finishes, rows are in window order.
    `dtype` runs the teacher in that autocast (see LiveTeacher).
    """
    from safetensors.torch import save_file

    teacher.eval()
    device = next(teacher.parameters()).device
    n, t = windows.shape
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(int(topk), vocab)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if deadline is not None else torch.arange(n)
    logprobs = torch.empty(n, t, k, dtype=torch.float32)
    indices = torch.empty(n, t, k, dtype=torch.int32)
    hidden: dict[int, torch.Tensor] = {}
    done = 0
    starts = range(0, n, batch_size)
    with capture_block_outputs(teacher, hidden_blocks) as captured:
        for start in track(starts, total=len(starts), description="teacher cache"):
            if deadline is not None and done and time.monotonic() > deadline:
                log.warning("the time budget allows the teacher on %d of %d training windows: "
                            "healing uses those", done, n)
                break
            rows = order[start:start + batch_size]
            with _autocast(teacher, dtype):
                logits = teacher(input_ids=windows[rows].to(device)).logits.float()
            top = torch.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
            logprobs[start:start + len(rows)] = top.values.cpu()
            indices[start:start + len(rows)] = top.indices.to(torch.int32).cpu()
            for b, h in captured.items():
                if b not in hidden:
                    hidden[b] = torch.empty(n, t, h.shape[-1], dtype=torch.bfloat16)
                hidden[b][start:start + len(rows)] = h.to(torch.bfloat16).cpu()
            done = start + len(rows)
    if done == n:  # complete: back to window order, so row i is window i
        back = torch.argsort(order)
        logprobs, indices = logprobs[back], indices[back]
        hidden = {b: h[back] for b, h in hidden.items()}
        order = torch.arange(n)
    tensors = {"logprobs": logprobs[:done], "indices": indices[:done], "window_ids": order[:done].clone(),
               **{f"hidden.{b}": h[:done] for b, h in hidden.items()}}
    meta = {"version": CACHE_VERSION, "topk": str(k), "temperature": repr(float(temperature)),
            "vocab_size": str(vocab), "windows": str(n), "seq_len": str(t), "covered": str(done),
            "hidden_blocks": json.dumps(sorted(hidden))}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp), metadata=meta)
    log.info("wrote the teacher cache %s (%d of %d windows x %d tokens, top %d)", path, done, n, t, k)
    return path


def check_cache(teacher_cache: CachedTeacher, windows: torch.Tensor, vocab_size: int) -> None:
    meta = teacher_cache.meta
    shape = (int(meta["windows"]), int(meta["seq_len"]))
    if shape != tuple(windows.shape) or int(meta["vocab_size"]) != vocab_size:
        raise DataError(
            f"the teacher cache {teacher_cache.path} was made for other windows or another vocabulary: "
            "delete it, or point --teacher-cache at another directory"
        )
