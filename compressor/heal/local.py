"""Local reconstruction: a first healing phase that runs only the blocks next to the cuts.

With `--train touched`, what trains sits in one segment of the student: from the first block before a cut
to the last block after one. The student's blocks before that segment are the teacher's, frozen, so
the segment's input is computed once per window (from the teacher's pass, or the student's own prefix
where the first block was cut) and stored with the teacher's hidden states it should reproduce: at each
cut and where each run of touched blocks ends (with `--reach 1`, after every touched block), the teacher's
output of the last original block it stands for (trainable.hidden_points "every"), scored by the per-token
relative error (losses.hidden_loss). A step then runs the segment
alone and stops: no prefix, no later blocks, no LM head. On SmolLM2 with one cut that is 2 of 24 blocks
and no 49k-word head, so a step costs a small fraction of a distillation step, and the same minutes see
many more windows. heal()'s distillation loop follows and trains on the whole output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from compressor.adapters import get_adapter
from compressor.heal.checkpoint import STATE_FILE
from compressor.heal.config import HealConfig
from compressor.heal.losses import hidden_loss
from compressor.heal.pair import check_teacher
from compressor.heal.schedule import WindowOrder
from compressor.heal.trainable import cut_points, hidden_points, touched_blocks
from compressor.surgery.edit import blocks_removed, compressor_record
from compressor.util.hooks import (
    StopForward,
    block_recorder,
    forward_until_stop,
    hidden_of,
    injector,
    stop_forward,
)
from compressor.util.progress import status, track

log = logging.getLogger(__name__)

# Local steps a distillation step is worth: on SmolLM2 with one cut, 4 windows a step on 2 CPU cores, 261 local
# steps ran in a 120 s phase (its targets pass included: at most 0.46 s a step) against 4.0 s a distillation
# step. `--steps` bounds the phase at local x steps x this.
LOCAL_STEPS_PER_STEP = 10


def seconds_left(config: HealConfig, started: float) -> float:
    """What --max-minutes leaves of the run started at `started` (time.monotonic)."""
    return config.max_minutes * 60 - (time.monotonic() - started)


def local_phase(student, teacher, windows: torch.Tensor, config: HealConfig, runtime, started: float):
    """(the teacher, loaded if it was a loader, and the phase's summary or None) after `config.local` of
    the run spent on local reconstruction. Skipped when resuming from saved training state (which holds
    its result already), and under torchrun / accelerate launch (one process only)."""
    if config.local <= 0 or (config.resume and (Path(config.checkpoint_dir) / STATE_FILE).is_file()):
        return teacher, None
    if runtime.world_size > 1:
        log.warning("local reconstruction runs in one process: skipped under %d processes", runtime.world_size)
        return teacher, None
    model = (teacher if isinstance(teacher, torch.nn.Module) else teacher()).to(runtime.device)
    check_teacher(student, model, compressor_record(student)["blocks_original"])
    seconds = config.local * seconds_left(config, started) if config.max_minutes else None
    steps = round(config.local * config.steps * LOCAL_STEPS_PER_STEP)
    return model, reconstruct_(student, model, windows.to(runtime.device), config, seconds, steps)


def local_targets(student, teacher, windows: torch.Tensor, batch_size: int = 4, deadline: float | None = None,
                  reach: int = 1):
    """(first, points, inputs, targets): the segment's first block, its matched points, and per window
    the segment's input and each point's teacher hidden state (bfloat16, on the CPU), for as many
    windows as `deadline` (time.monotonic) allows."""
    record = compressor_record(student)
    touched = touched_blocks(record, reach)
    # matched at each cut and where a run of touched blocks ends (with reach 1, after every touched block): a
    # touched block inside a run is free to change what it passes on, as long as the run's output matches
    cuts = {p.student_block for p in cut_points(record)}
    points = [p for p in hidden_points(record, "every") if p.student_block in touched
              and (p.student_block in cuts or p.student_block + 1 not in touched)]
    first, kept = touched[0], record["kept"]
    from_teacher = kept[:first + 1] == list(range(first + 1))  # no cut before it: its input is the teacher's
    inputs, targets = [], {p.teacher_block: [] for p in points}
    t_blocks, s_blocks = get_adapter(teacher).blocks_of(teacher), get_adapter(student).blocks_of(student)
    seen: dict[str, torch.Tensor] = {}
    handles = [t_blocks[b].register_forward_hook(block_recorder(seen, b, stop=b == max(targets))) for b in targets]
    anchor = t_blocks[first] if from_teacher else s_blocks[first]
    handles.append(anchor.register_forward_pre_hook(_keep_input(seen), with_kwargs=True))
    if not from_teacher:
        handles.append(s_blocks[first].register_forward_hook(stop_forward))
    try:
        for start in track(range(0, len(windows), batch_size), description="local targets"):
            ids = windows[start:start + batch_size]
            forward_until_stop(teacher, ids)
            if not from_teacher:
                forward_until_stop(student, ids)
            inputs.append(seen["input"].to("cpu", torch.bfloat16))
            for b, kept_states in targets.items():
                kept_states.append(seen[f"h{b}"].to("cpu", torch.bfloat16))
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        for h in handles:
            h.remove()
    return first, points, torch.cat(inputs), {b: torch.cat(t) for b, t in targets.items()}


def reconstruct_(student, teacher, windows: torch.Tensor, config: HealConfig, seconds: float | None,
                 steps: int) -> dict:
    """Train the touched blocks of `student` in place on the local objective for `steps` steps or
    `seconds` (None: no time bound), whichever comes first; the targets' pass counts in the time.
    Returns a summary."""
    start = time.monotonic()
    deadline = start + 0.3 * seconds if seconds is not None else None
    status("local reconstruction: the teacher's hidden states at the touched blocks")
    first, points, inputs, targets = local_targets(student, teacher, windows, config.batch_size, deadline,
                                                   config.reach)
    n = len(inputs)
    blocks = get_adapter(student).blocks_of(student)
    last = blocks[max(p.student_block for p in points)]
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    order, device = WindowOrder(n, config.seed), next(student.parameters()).device
    seen: dict[str, torch.Tensor] = {}
    handles = [blocks[p.student_block].register_forward_hook(_keep(seen, f"s{p.student_block}")) for p in points]
    handles += [blocks[first].register_forward_pre_hook(injector(seen), with_kwargs=True),
                last.register_forward_hook(stop_forward)]
    train_start, done, losses = time.monotonic(), 0, []
    budget = None if seconds is None else seconds - (train_start - start)
    student.train()
    status(f"local reconstruction: blocks {sorted({p.student_block for p in points})} on {n} windows")
    try:
        with blocks_removed(student, range(first)) if first else contextlib.nullcontext():
            while True:
                elapsed = time.monotonic() - train_start
                if done >= steps or (budget is not None and elapsed >= budget):
                    break  # (a targets pass that overran leaves no budget: no step)
                progress = max(done / steps, elapsed / budget if budget is not None else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = _lr(config, progress, done)
                rows = order.take(done * config.batch_size, config.batch_size)
                seen["resume"] = inputs[rows].to(device).float()
                ids = windows[rows.to(windows.device)]
                try:
                    student(input_ids=ids, use_cache=False)
                except StopForward:
                    pass
                loss = torch.stack([hidden_loss(seen[f"s{p.student_block}"], targets[p.teacher_block][rows].to(device))
                                    for p in points]).mean()
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                done += 1
                if done % (config.log_every * 10) == 0:
                    log.info("local step %d: relative error %.4f", done, sum(losses[-10:]) / len(losses[-10:]))
    finally:
        for h in handles:
            h.remove()
    seconds_spent = round(time.monotonic() - start, 2)
    log.info("local reconstruction: %d steps on %d windows in %.0f s, relative error %.4f -> %.4f", done, n,
             seconds_spent, losses[0] if losses else math.nan, losses[-1] if losses else math.nan)
    return {"steps": done, "windows": n, "seconds": seconds_spent,
            "error_first": losses[0] if losses else None, "error_last": losses[-1] if losses else None}


def _lr(config: HealConfig, progress: float, step: int) -> float:
    """Linear warm-up over config.warmup steps, then cosine decay by the share of the phase done."""
    if step < config.warmup:
        return config.lr * (step + 1) / (config.warmup + 1)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _keep(seen: dict, key: str):
    """A forward hook that keeps the block's output as it is, in the autograd graph."""
    def hook(module, args, output):
        seen[key] = hidden_of(output)
    return hook


def _keep_input(seen: dict):
    def hook(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    return hook
