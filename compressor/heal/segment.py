"""The part of the student that trains, and running it from where it begins.

With `--train touched`, what trains sits in one segment of the student: from its first touched block
(touched_blocks(record, reach)[0]) to its last. Every block before the segment is the teacher's own
block, frozen, so the segment's input is the teacher's hidden state there: one teacher pass over the
training windows (the teacher cache) gives it, with the targets inside the segment, and no later
forward needs to run the prefix again (from the cache that input is the teacher's hidden state rounded to
bfloat16, as local reconstruction has always read it). Local reconstruction runs only the segment;
distillation runs from the segment to the LM head. On SmolLM2 with 6 of 30 blocks cut after block 12, that skips half
the student's blocks in every forward.
"""

from __future__ import annotations

import contextlib

import torch

from compressor.adapters import get_adapter
from compressor.heal.trainable import CutPoint, cut_points, hidden_points, touched_blocks
from compressor.surgery.edit import blocks_removed, compressor_record
from compressor.util.hooks import injector


def segment(record: dict, reach: int = 1) -> tuple[int, list[CutPoint]]:
    """(first, points): the student's first touched block, and where local reconstruction matches the
    teacher: at each cut and where a run of touched blocks ends (with reach 1, after every touched
    block). A touched block inside a run is free to change what it passes on, as long as the run's
    output matches."""
    touched = touched_blocks(record, reach)
    cuts = {p.student_block for p in cut_points(record)}
    points = [p for p in hidden_points(record, "every") if p.student_block in touched
              and (p.student_block in cuts or p.student_block + 1 not in touched)]
    return touched[0], points


def input_block(first: int) -> int | None:
    """The teacher block whose output is the input of the student's block `first`, when blocks before it
    are the teacher's own (the first touched block is then `first` >= 1: it stands before the first
    cut); None when `first` is 0, whose input is the embeddings."""
    return first - 1 if first > 0 else None


def prefix_skippable(student, config, runtime) -> int:
    """The student's first touched block when distillation may start its forwards there (0: it may not).

    It may when only touched blocks train and the blocks before them compute what the teacher's do:
    not under quantization-aware training (the student's prefix is fake-quantized), not with the
    linearity regularizer (it reads every block), and in one process (DDP and FSDP wrap the blocks).
    """
    if (config.train != "touched" or config.quantization_aware or config.regularize_linearity
            or runtime.world_size > 1):
        return 0
    record = compressor_record(student)
    if not record.get("removed"):
        return 0
    return touched_blocks(record, config.reach)[0]


@contextlib.contextmanager
def started_at(model: torch.nn.Module, first: int, seen: dict):
    """Run `model` from its block `first` for the `with`: the blocks before it are taken out, and block
    `first` takes seen["resume"] as its input hidden states (the embedding lookup still runs; its output
    is dropped). Block indices inside the `with` count from `first`."""
    if first == 0:
        yield
        return
    handle = get_adapter(model).blocks_of(model)[first].register_forward_pre_hook(injector(seen),
                                                                                     with_kwargs=True)
    try:
        with blocks_removed(model, range(first)):
            yield
    finally:
        handle.remove()
