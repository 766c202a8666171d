"""What healing trains (the parts of the model the surgery touched, everything, the norms and biases, or
LoRA adapters), and where the student's hidden states are matched to the teacher's.

The surgery record (`model.config.compressor`, see compressor.surgery.edit) says which original blocks
were kept and which removed or linearized. A cut is a run of removed original blocks; the kept
blocks on either side of it now see inputs (or feed successors) they were never trained for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compressor.adapters import get_adapter
from compressor.blocks import runs
from compressor.errors import CompressorError
from compressor.surgery.edit import compressor_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutPoint:
    """A cut in the student: its block `student_block` (current numbering) now feeds what original
    block `teacher_block + 1` used to receive, so its output should match the teacher's output of
    block `teacher_block`."""

    student_block: int
    teacher_block: int


def removed_runs(record: dict) -> list[tuple[int, int]]:
    """Maximal runs of removed original blocks, as inclusive (first, last) pairs."""
    return [(start, end - 1) for start, end in runs(record.get("removed", []))]


def touched_blocks(record: dict, reach: int = 1) -> list[int]:
    """Current indices of the kept blocks right before and right after each cut; with `reach` r, the r kept
    blocks on each side of it."""
    kept = record["kept"]
    position = {orig: i for i, orig in enumerate(kept)}
    touched = set()
    for first, last in removed_runs(record):
        before = [position[b] for b in kept if b < first][-reach:]
        after = [position[b] for b in kept if b > last][:reach]
        touched.update(before + after)
    return sorted(touched)


def cut_points(record: dict) -> list[CutPoint]:
    """Where the student's hidden state should match the teacher's: one per cut with a block before it."""
    kept = record["kept"]
    points = []
    for i, (orig, nxt) in enumerate(zip(kept, kept[1:] + [record["blocks_original"]])):
        if nxt > orig + 1:
            points.append(CutPoint(student_block=i, teacher_block=nxt - 1))
    return points


def hidden_points(record: dict, at: str = "cuts") -> list[CutPoint]:
    """Where the student's hidden states are matched to the teacher's: at the cuts (`cut_points`), or
    after "every" kept block, each against the teacher's output of the last original block it stands
    for (its own, or the last removed one before the next kept block)."""
    if at == "cuts":
        return cut_points(record)
    if at != "every":
        raise CompressorError(f"unknown --hidden-at '{at}': choose cuts or every")
    kept = record["kept"]
    return [CutPoint(student_block=i, teacher_block=nxt - 1)
            for i, nxt in enumerate(kept[1:] + [record["blocks_original"]])]


def select_trainable_(model: torch.nn.Module, train: str, reach: int = 1) -> list[str]:
    """Set requires_grad on what `train` names ("touched", "all" or "norms"); freeze the rest. Returns the
    names.

    "norms": every one-dimensional parameter, that is the normalization scales and the biases (no
    architecture names them alike, but all of them are vectors, and no weight matrix is).

    "touched": every parameter of the blocks next to a cut (the `reach` kept blocks on each side of it),
    and the MLP output projection of the block before each linearized span (where a linear map was
    folded in; already part of the first set whenever that block sits next to the cut).
    """
    if train == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    if train == "norms":
        names = []
        for name, p in model.named_parameters():
            p.requires_grad_(p.ndim == 1)
            names += [name] if p.ndim == 1 else []
        log.info("training %d normalization scales and biases", len(names))
        return names
    if train != "touched":
        raise CompressorError(f"unknown --train '{train}': choose touched, all, norms or lora")
    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    record = compressor_record(model)
    touched = touched_blocks(record, reach)
    modules = [blocks[i] for i in touched]
    position = {orig: i for i, orig in enumerate(record["kept"])}
    for span in record.get("linearized", []):
        before = position.get(span["start"] - 1)
        if before is not None:
            modules.append(adapter.mlp_out_of(blocks[before]))
    if not modules:
        raise CompressorError(
            "the model records no removed blocks, so healing has nothing 'touched' to train: "
            "prune it first, or pass --train all or --train lora"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = {id(p) for m in modules for p in m.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in wanted:
            p.requires_grad_(True)
            names.append(name)
    log.info("training %d tensors in blocks %s (next to the cuts)", len(names), touched)
    return names


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of every Linear layer inside the decoder blocks (LoRA goes on all of them)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style blocks use Conv1D, which peft supports

    adapter = get_adapter(model)
    prefix = adapter.blocks
    return [f"{prefix}.{name}" for name, m in adapter.blocks_of(model).named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D))]
