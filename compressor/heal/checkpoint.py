"""Training state that an interrupted healing run resumes from.

One file, `state.pt` in the checkpoint directory, replaced atomically: the trainable parameters and
the optimizer state (full, name-keyed tensors, so the world size may change between runs), the step,
the planned number of steps (the schedule is a pure function of step and plan), the RNG states, the
settings that fix the schedule and the hash of the training windows. Rank 0 alone writes it; every
rank reads it. Loaded with `weights_only=True`: no pickled code runs.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.util.io import atomic_file

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(runtime, directory: Path, model, optimizer, progress: dict) -> None:
    """Gather the state (a collective: every rank calls this) and write it from rank 0."""
    model_state = runtime.model_state(model, trainable_only=True)
    optimizer_state = runtime.optimizer_state(model, optimizer)
    if runtime.is_main:
        payload = {"model": model_state, "optimizer": optimizer_state, "rng": rng_state(), **progress}
        with atomic_file(Path(directory) / STATE_FILE) as tmp:
            torch.save(payload, tmp)
        log.info("saved training state at step %d to %s", progress["step"], directory)
    runtime.barrier()


def load_state(directory: Path) -> dict | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CompressorError(f"cannot read the training state {path} ({exc}): "
                              "delete it to start over") from None


def check_resumable(state: dict, schedule_key: dict, windows_digest: str, directory: Path) -> None:
    """Refuse to resume a run whose schedule or data differ: the result would match neither run."""
    if state.get("windows") != windows_digest:
        raise CompressorError(f"the training state in {directory} was made on other training windows: "
                              "use the same --data/--samples/--seq-len/--seed, or drop --resume")
    changed = sorted(k for k, v in schedule_key.items() if state.get("schedule", {}).get(k) != v)
    if changed:
        raise CompressorError(f"the training state in {directory} used other settings ({', '.join(changed)}): "
                              "pass the same ones to resume, or drop --resume")
