"""Local reconstruction: a first healing phase that runs only the blocks next to the cuts.

With `--train touched`, what trains sits in one segment of the student (compressor.heal.segment), whose
input is the teacher's hidden state there. The segment's input and the teacher's hidden states it should
reproduce, at each cut and where each run of touched blocks ends (with `--reach 1`, after every touched
block), come from the teacher cache (one teacher pass over the training windows, shared with
distillation's top-k targets: local_phase_cached) or, without a cache, from a pass of its own over as many
windows as 30% of the phase allows (local_phase). They are scored by the per-token relative error
(losses.hidden_loss). A step then runs the segment alone and stops: no prefix, no later blocks, no LM
head. On SmolLM2 with one cut that is 2 of 24 blocks and no 49k-word head, so a step costs a small
fraction of a distillation step, and the same minutes see many more windows. heal()'s distillation loop
follows and trains on the whole output.
"""

from __future__ import annotations

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
from compressor.heal.segment import input_block, segment, started_at
from compressor.surgery.edit import compressor_record
from compressor.util.hooks import StopForward, block_recorder, forward_until_stop, hidden_of, stop_forward
from compressor.util.progress import status, track

log = logging.getLogger(__name__)

# Local steps a distillation step is worth, for `--steps`: on SmolLM2 with one cut, 4 windows a step on 2 CPU cores, a
# local step took 0.31 s and a distillation step 2.5 s (started at the first touched block) to 4.0 s (the whole model).
# `--steps` bounds the phase at local x steps x this.
LOCAL_STEPS_PER_STEP = 10


def seconds_left(config: HealConfig, started: float) -> float:
    """What --max-minutes leaves of the run started at `started` (time.monotonic)."""
    return config.max_minutes * 60 - (time.monotonic() - started)


def runs_local(config: HealConfig, runtime) -> bool:
    """Whether local reconstruction runs: asked for, not resuming from saved training state (which holds
    its result already), and in one process (under torchrun / accelerate launch it is skipped)."""
    if config.local <= 0 or (config.resume and (Path(config.checkpoint_dir) / STATE_FILE).is_file()):
        return False
    if runtime.world_size > 1:
        log.warning("local reconstruction runs in one process: skipped under %d processes", runtime.world_size)
        return False
    return True


def _budget(config: HealConfig, started: float) -> tuple[float | None, int]:
    """(seconds, steps): `config.local` of the time --max-minutes leaves, and of --steps x LOCAL_STEPS_PER_STEP."""
    seconds = config.local * seconds_left(config, started) if config.max_minutes else None
    return seconds, round(config.local * config.steps * LOCAL_STEPS_PER_STEP)


def local_phase(student, teacher, windows: torch.Tensor, config: HealConfig, runtime, started: float):
    """(the teacher, loaded if it was a loader, and the phase's summary) after `config.local` of
    the run spent on local reconstruction, with targets from a pass of the live teacher over `windows`
    (used when there is no teacher cache; see local_phase_cached). Call it when runs_local()."""
    model = (teacher if isinstance(teacher, torch.nn.Module) else teacher()).to(runtime.device)
    check_teacher(student, model, compressor_record(student)["blocks_original"])
    seconds, steps = _budget(config, started)
    return model, reconstruct_(student, model, windows.to(runtime.device), config, seconds, steps)


def local_cache_blocks(student, config: HealConfig) -> list[int]:
    """The teacher blocks whose outputs local reconstruction reads from the teacher cache: the segment's
    input (when it has blocks before it) and its matched points."""
    first, points = segment(compressor_record(student), config.reach)
    before = input_block(first)
    return sorted({p.teacher_block for p in points} | ({before} if before is not None else set()))


def local_phase_cached(student, cache, windows: torch.Tensor, config: HealConfig, runtime, started: float) -> dict:
    """The phase's summary after `config.local` of the time left spent on
    local reconstruction, reading its inputs and targets from the teacher cache `cache`
    (teacher_cache.CachedTeacher, holding local_cache_blocks; `windows` are its rows' windows): no
    teacher pass of its own, and every window the cache covers. Call it when runs_local()."""
    first, points = segment(compressor_record(student), config.reach)
    before = input_block(first)

    def rows_of(rows):
        return (cache.hidden_rows(before, rows) if before is not None else None,
                {p.teacher_block: cache.hidden_rows(p.teacher_block, rows) for p in points})

    seconds, steps = _budget(config, started)
    status(f"local reconstruction: blocks {sorted({p.student_block for p in points})} on {len(windows)} windows "
           "(targets from the teacher cache)")
    return _train(student, windows.to(runtime.device), first, points, rows_of, config, seconds, steps,
                  time.monotonic())


def local_targets(student, teacher, windows: torch.Tensor, batch_size: int = 4, deadline: float | None = None,
                  reach: int = 1):
    """(first, points, inputs, targets): the segment's first block, its matched points (segment()), and per
    window the segment's input and each point's teacher hidden state (bfloat16, on the CPU), for as many
    windows as `deadline` (time.monotonic) allows."""
    record = compressor_record(student)
    first, points = segment(record, reach)
    kept = record["kept"]
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
    `seconds` (None: no time bound), whichever comes first, with targets from a pass of `teacher` (at
    most 30% of `seconds`; it counts in the time). Returns a summary."""
    start = time.monotonic()
    deadline = start + 0.3 * seconds if seconds is not None else None
    status("local reconstruction: the teacher's hidden states at the touched blocks")
    first, points, inputs, targets = local_targets(student, teacher, windows, config.batch_size, deadline,
                                                   config.reach)

    def rows_of(rows):
        return inputs[rows], {b: t[rows] for b, t in targets.items()}

    status(f"local reconstruction: blocks {sorted({p.student_block for p in points})} on {len(inputs)} windows")
    return _train(student, windows[:len(inputs)], first, points, rows_of, config, seconds, steps, start)


def _train(student, windows: torch.Tensor, first: int, points, rows_of, config: HealConfig,
           seconds: float | None, steps: int, start: float) -> dict:
    """The local steps: each runs the segment alone (from block `first`, fed rows_of(rows)[0], to the last
    matched point) on config.batch_size of `windows` and matches rows_of(rows)[1] at `points`, until
    `steps` or `seconds` since `start` (time.monotonic) are spent."""
    n = len(windows)
    blocks = get_adapter(student).blocks_of(student)
    last = blocks[max(p.student_block for p in points)]
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    order, device = WindowOrder(n, config.seed), next(student.parameters()).device
    seen: dict[str, torch.Tensor] = {}
    handles = [blocks[p.student_block].register_forward_hook(_keep(seen, f"s{p.student_block}")) for p in points]
    handles.append(last.register_forward_hook(stop_forward))
    train_start, done, losses = time.monotonic(), 0, []
    budget = None if seconds is None else seconds - (train_start - start)
    student.train()
    try:
        with started_at(student, first, seen):
            while True:
                elapsed = time.monotonic() - train_start
                if done >= steps or (budget is not None and elapsed >= budget):
                    break  # (a targets pass that overran leaves no budget: no step)
                progress = max(done / steps, elapsed / budget if budget is not None else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = _lr(config, progress, done)
                rows = order.take(done * config.batch_size, config.batch_size)
                segment_input, targets = rows_of(rows)
                if segment_input is not None:
                    seen["resume"] = segment_input.to(device).float()
                try:
                    student(input_ids=windows[rows.to(windows.device)], use_cache=False)
                except StopForward:
                    pass
                loss = torch.stack([hidden_loss(seen[f"s{p.student_block}"], targets[p.teacher_block].to(device))
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
