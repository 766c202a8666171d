"""Healing: a short distillation fine-tune of a pruned student against its unpruned teacher.

`heal(...)` reads top to bottom: check the inputs, pick the runtime (one process, or a rank of a
torchrun/accelerate launch), get the teacher's targets (live or from the cache), measure perplexity,
choose what trains, build the optimizer, resume if asked, run the loop, measure again, hand back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.heal.checkpoint import check_resumable, load_state, save_state, set_rng_state
from compressor.heal.config import HealConfig, HealResult
from compressor.heal.distributed import Runtime, make_runtime
from compressor.heal.local import (
    local_cache_blocks,
    local_phase,
    local_phase_cached,
    runs_local,
    seconds_left,
)
from compressor.heal.losses import (
    LinearityRegularizer,
    capture_block_outputs,
    capture_hidden_states,
    hidden_loss,
    lm_loss,
)
from compressor.heal.pair import check_teacher, check_windows, vocab_size
from compressor.heal.precision import autocast, autocast_dtype
from compressor.heal.quantaware import quantization_aware
from compressor.heal.schedule import (
    STEADY_STEPS,
    TIMING_STEPS,
    LossSums,
    StepPlan,
    WindowOrder,
    agree,
    log_line,
    lr_at,
    replan,
    set_lr,
    training_budget,
)
from compressor.heal.segment import prefix_skippable, started_at
from compressor.heal.teacher_cache import (
    CachedTeacher,
    LiveTeacher,
    build_cache,
    cache_path,
    check_cache,
    evict,
)
from compressor.heal.trainable import hidden_points, select_trainable_
from compressor.surgery.edit import compressor_record
from compressor.util.fingerprint import windows_fingerprint
from compressor.util.progress import status, track

log = logging.getLogger(__name__)

TeacherArg = torch.nn.Module | Callable[[], torch.nn.Module]


def heal(student: torch.nn.Module, teacher: TeacherArg, train_windows: torch.Tensor,
         eval_windows: torch.Tensor | None = None, config: HealConfig | None = None) -> HealResult:
    """Fine-tune `student` in place to recover what pruning lost; returns what happened.

    teacher: the unpruned model, or a function that loads it (then, with a teacher cache, it is
        loaded only to fill the cache and dropped before training).
    train_windows / eval_windows: LongTensor [N, T] of token ids (eval: perplexity before and after).
    Under torchrun/accelerate launch every rank calls this with the same arguments.
    config.quantization_aware: train through the export's fake quantizer (compressor.heal.quantaware).
    """
    config = config or HealConfig()
    config.validate()
    with quantization_aware(student, teacher, config.quantization_aware, config.train) as record:
        result = _heal(student, teacher, train_windows, eval_windows, config)
    result.quantization_aware = record.to_dict() if record else None
    return result


def _heal(student, teacher: TeacherArg, train_windows, eval_windows, config: HealConfig) -> HealResult:
    started = time.monotonic()
    vocab = vocab_size(student)
    check_windows(train_windows, vocab, "training")
    if eval_windows is not None:
        check_windows(eval_windows, vocab, "evaluation")
    device = config.device or next(student.parameters()).device
    runtime = make_runtime(config.distributed, device, student)
    if runtime.strategy == "fsdp" and config.train == "lora":
        raise CompressorError("LoRA under FSDP is not supported (its optimizer state is small): "
                              "use --distributed ddp")
    torch.manual_seed(config.seed)
    student.to(runtime.device)

    # What trains: the blocks next to each cut, everything, the norms and biases, or LoRA adapters.
    model, lora = _trainable(student, config)

    ppl_before, eval_seconds = _perplexity_before(student, eval_windows, runtime, config)

    # Local reconstruction (the touched blocks alone against the teacher's hidden states) comes first when
    # asked; without a teacher cache it makes its own teacher pass now.
    local, run_local, cached = None, runs_local(config, runtime), config.teacher_cache is not None
    if run_local and not cached:
        teacher, local = local_phase(student, teacher, train_windows, config, runtime, started)

    # The teacher's targets: live, or the cache (filled once by rank 0, read by every rank). They hold the
    # hidden states local reconstruction reads, and the input of the first touched block when distillation
    # starts there (compressor.heal.segment).
    points = hidden_points(compressor_record(student), config.hidden_at) if config.hidden_weight > 0 else []
    first = prefix_skippable(student, config, runtime)
    # (a resumed run, which skips local reconstruction, asks for the same blocks: it reuses the same cache)
    wants_local = cached and config.local > 0 and runtime.world_size == 1
    local_blocks = local_cache_blocks(student, config) if wants_local else []
    extra = local_blocks + ([first - 1] if first else [])
    share = 0.4 * (1 - config.local) if run_local and cached else 0.4  # local reconstruction's share comes after
    deadline = time.monotonic() + share * seconds_left(config, started) if config.max_minutes else None
    targets, cache_file = _teacher_targets(teacher, student, train_windows, points, config, runtime, deadline, extra)
    del teacher  # what the loop needs is in `targets` (a live teacher holds its model)
    if isinstance(targets, CachedTeacher) and not targets.complete:
        train_windows = train_windows[targets.window_ids]  # the windows the time budget gave the teacher
    if run_local and cached:
        local = local_phase_cached(student, targets, train_windows, config, runtime, started)

    loop = _Loop(config, runtime, *_optimize(model, config, runtime, lora), targets, points, train_windows, first)
    loop.resume()
    loop.run(training_budget(config, time.monotonic() - started, eval_seconds, loop.seconds_before))

    # Measure, fold LoRA back, hand back a plain model in eval mode.
    loop.model.eval()
    ppl_after = window_perplexity(loop.model, eval_windows, runtime, config) if eval_windows is not None else None
    if ppl_after is not None:
        log.info("perplexity after healing: %.3f (before: %.3f)", ppl_after, ppl_before)
    healed, full_state = _hand_back(loop.model, runtime, lora)
    ran, history, train_seconds = loop.done - loop.first_step, loop.history, loop.train_seconds
    tokens_per_step = loop.tokens_per_step
    return HealResult(
        steps=loop.done, planned_steps=loop.plan.planned, stopped_by=loop.stopped_by,
        tokens=loop.done * tokens_per_step, seconds=round(loop.seconds_before + train_seconds, 3),
        tokens_per_second=round(ran * tokens_per_step / train_seconds, 1) if ran else 0.0,
        trainable_parameters=loop.trainable,
        loss_first=history[0]["loss"] if history else None, loss_last=history[-1]["loss"] if history else None,
        ppl_before=ppl_before, ppl_after=ppl_after, resumed_from=loop.resumed_from,
        teacher_cache=str(cache_file) if cache_file else None, world_size=runtime.world_size,
        precision=str(autocast_dtype(runtime.device, config) or torch.float32).removeprefix("torch."),
        history=history, model=healed, full_state_dict=full_state, is_main=runtime.is_main, local=local,
    )


def _perplexity_before(student, eval_windows, runtime: Runtime, config: HealConfig) -> tuple[float | None, float]:
    """Held-out perplexity before healing, and the seconds it took (the time budget counts them twice:
    the same evaluation runs after training)."""
    if eval_windows is None:
        return None, 0.0
    start = time.monotonic()
    ppl = window_perplexity(student, eval_windows, runtime, config)
    log.info("perplexity before healing: %.3f", ppl)
    return ppl, time.monotonic() - start


def _optimize(model, config: HealConfig, runtime: Runtime, lora: bool):
    """(model, the model the hooks attach to, optimizer, trainable parameters, their count) once the
    runtime wrapped them (the count is taken before: FSDP shards them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = runtime.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP swaps them for sharded ones
    base = runtime.unwrap(model)
    base = base.get_base_model() if lora else base  # the model whose blocks the hooks attach to
    return model, base, optimizer, params, trainable


class _Loop:
    """The training loop and the state it carries: step, planned steps, history, time spent."""

    def __init__(self, config: HealConfig, runtime: Runtime, model, base, optimizer, params, trainable: int,
                 targets, points, windows: torch.Tensor, first: int = 0):
        self.config, self.runtime, self.model, self.base = config, runtime, model, base
        self.first = first  # forwards start at this block, fed the teacher's hidden state (segment.started_at)
        self.optimizer, self.params, self.targets, self.points, self.windows = optimizer, params, targets, points, windows
        self.trainable = trainable
        self.regularizer = LinearityRegularizer(config.regularize_linearity) if config.regularize_linearity else None
        self.per_step = config.batch_size * config.grad_accum * runtime.world_size
        self.tokens_per_step = self.per_step * windows.shape[1]
        self.digest = windows_fingerprint(windows)
        self.stopped_by, self.train_seconds = "steps", 0.0

    def resume(self) -> None:
        """Trainable weights, optimizer, RNG, step and the planned schedule, from the saved state if asked."""
        step, planned, self.history, self.seconds_before = _resume(self.config, self.runtime, self.model,
                                                                   self.optimizer, self.digest)
        self.first_step = self.done = step
        self.resumed_from = step if self.config.resume and step else None
        self.plan = StepPlan(planned)

    def run(self, budget: float | None) -> None:
        config, runtime = self.config, self.runtime
        order, sums = WindowOrder(len(self.windows), config.seed), LossSums(runtime.device)
        self.model.train()
        status(f"healing: {self.plan.planned - self.first_step} steps of {self.per_step} windows ({config.train})")
        loop_start, timed = time.monotonic(), 0.0
        for step in track(self.plan.steps(self.first_step), total=self.plan.planned - self.first_step,
                          description="healing"):
            self._step(step, order, sums)
            self.done = done = step + 1
            elapsed = agree(runtime, time.monotonic() - loop_start)
            if budget is not None and done - self.first_step == TIMING_STEPS:
                timed = elapsed
                self.plan.planned = replan(self.plan.planned, done, elapsed / TIMING_STEPS, budget - elapsed,
                                           config.steps)
            if budget is not None and done - self.first_step == STEADY_STEPS:
                per_step_now = (elapsed - timed) / (STEADY_STEPS - TIMING_STEPS)
                self.plan.planned = replan(self.plan.planned, done, per_step_now, budget - elapsed, config.steps)
            self._log_and_save(done, sums, elapsed)
            if budget is not None and elapsed >= budget and done < self.plan.planned:
                self.stopped_by = "time"
                log.warning("stopping at step %d of %d: --max-minutes reached", done, self.plan.planned)
                break
        self.train_seconds = time.monotonic() - loop_start

    def _step(self, step: int, order: WindowOrder, sums: LossSums) -> None:
        config, runtime, model = self.config, self.runtime, self.model
        set_lr(self.optimizer, lr_at(step, self.plan.planned, config))
        for micro in range(config.grad_accum):  # this rank's slice of each micro-batch of the global batch
            micro_batch = step * config.grad_accum + micro
            window_ids = order.take((micro_batch * runtime.world_size + runtime.rank) * config.batch_size,
                                    config.batch_size)
            ids = self.windows[window_ids].to(runtime.device)
            with contextlib.nullcontext() if micro == config.grad_accum - 1 else runtime.no_sync(model):
                parts = _losses(model, self.base, self.targets, window_ids, ids, self.points, self.regularizer,
                                config, runtime, self.first)
                runtime.backward(parts["loss"] / config.grad_accum)
            sums.add(parts)
        if config.max_grad_norm:
            runtime.clip_grad_norm_(model, self.params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_and_save(self, done: int, sums: LossSums, elapsed: float) -> None:
        config, planned = self.config, self.plan.planned
        if done % config.log_every == 0 or done == planned:
            speed = (done - self.first_step) * self.tokens_per_step / elapsed
            self.history.append(sums.report(self.runtime, done, self.optimizer, speed))
            log.info(log_line(self.history[-1], planned))
        if config.checkpoint_dir and done % config.checkpoint_every == 0 and done < planned:
            save_state(self.runtime, config.checkpoint_dir, self.model, self.optimizer, {
                "step": done, "planned_steps": planned, "schedule": config.schedule_key(self.runtime.world_size),
                "windows": self.digest, "seconds": self.seconds_before + elapsed, "history": self.history})


# --- the pieces heal() uses, in the order it uses them ---------------------------------------------

def check_pair(student, teacher, blocks: list[int]) -> None:
    """The teacher must speak the student's vocabulary at the student's width (and depth when its hidden
    states at `blocks` are read)."""
    check_teacher(student, teacher, compressor_record(student)["blocks_original"] if blocks else None)


def _teacher_targets(teacher, student, windows, points, config: HealConfig, runtime: Runtime,
                     deadline: float | None, extra: list[int]):
    """(the targets, the cache file or None): the teacher's top-k log-probabilities or logits, and its
    hidden states at the points' teacher blocks and at `extra` blocks."""
    blocks = sorted({p.teacher_block for p in points} | set(extra))
    dtype = autocast_dtype(runtime.device, config)  # the teacher runs in the student's training precision
    if config.teacher_cache is None:
        model = _materialize(teacher)
        check_pair(student, model, blocks)
        return LiveTeacher(model.to(runtime.device), blocks, dtype), None
    path = None
    if runtime.is_main:
        model = _materialize(teacher).to(runtime.device)
        check_pair(student, model, blocks)
        path = cache_path(Path(config.teacher_cache), model, windows, config.topk, config.temperature, blocks,
                          dtype)
        if path.is_file():
            log.info("reusing the teacher cache %s", path)
            os.utime(path)  # recently used: the last to be evicted
        else:
            status(f"computing the teacher's top-{config.topk} log-probabilities (once; cached)")
            build_cache(model, windows, path, config.topk, config.temperature, blocks, config.batch_size,
                        deadline, config.seed, dtype)
            evict(path.parent, keep=path)
        del model
    path = _broadcast_path(runtime, path)
    cached = CachedTeacher(path, runtime.device)
    check_cache(cached, windows, vocab_size(student))
    if not cached.complete:
        log.info("the teacher cache covers %d of %d windows: healing trains on those", len(cached.window_ids),
                 len(windows))
    return cached, path


def _materialize(teacher: TeacherArg) -> torch.nn.Module:
    return teacher if isinstance(teacher, torch.nn.Module) else teacher()


def _broadcast_path(runtime: Runtime, path):
    if runtime.world_size == 1:
        return path
    import torch.distributed as dist

    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, runtime: Runtime | None = None,
                      config: HealConfig | None = None) -> float:
    """exp(mean next-token NLL) over every predicted position of every window (shared across ranks)."""
    runtime = runtime or Runtime(next(model.parameters()).device)
    config = config or HealConfig()
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count = torch.zeros((), dtype=torch.float64, device=runtime.device)
    mine = windows[runtime.rank::runtime.world_size]
    for start in range(0, len(mine), config.eval_batch_size):
        ids = mine[start:start + config.eval_batch_size].to(runtime.device)
        with autocast(runtime, config, training=False):
            logits = model(input_ids=ids, use_cache=False).logits
        nll += lm_loss(logits, ids).double() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp((runtime.all_reduce(nll) / runtime.all_reduce(count)).item())


def _trainable(student, config: HealConfig):
    if config.train == "lora":
        from compressor.heal.lora import add_lora

        return add_lora(student, config.lora_rank, config.lora_alpha, config.seed), True
    select_trainable_(student, config.train, config.reach)
    return student, False


def _resume(config: HealConfig, runtime: Runtime, model, optimizer, digest: str):
    """(step, planned steps, history, seconds already trained): from the saved state, or a fresh start."""
    state = load_state(config.checkpoint_dir) if config.resume else None
    if state is None:
        if config.resume:
            log.info("no training state in %s yet: starting from step 0", config.checkpoint_dir)
        return 0, config.steps, [], 0.0
    check_resumable(state, config.schedule_key(runtime.world_size), digest, config.checkpoint_dir)
    runtime.load_state(model, optimizer, state["model"], state["optimizer"])
    set_rng_state(state["rng"])
    log.info("resuming at step %d of %d from %s", state["step"], state["planned_steps"], config.checkpoint_dir)
    return state["step"], state["planned_steps"], list(state["history"]), state["seconds"]


def _hand_back(model, runtime: Runtime, lora: bool):
    """The plain healed model in eval mode (LoRA folded in), and under FSDP its gathered weights."""
    full_state = runtime.model_state(model, trainable_only=False) if runtime.strategy == "fsdp" else None
    healed = runtime.unwrap(model)
    if lora:
        from compressor.heal.lora import merge_lora

        healed = merge_lora(healed)
    for p in healed.parameters():
        p.requires_grad_(True)
    return healed.eval(), full_state


def _losses(model, base, targets, window_ids, ids, points, regularizer, config, runtime, first: int = 0) -> dict:
    """One micro-batch: the teacher's targets, the student's forward (from block `first`, fed the teacher's
    hidden state there), and every term of the loss."""
    teacher = targets.targets(window_ids, ids)
    student_blocks = [p.student_block for p in points]
    seen = {"resume": teacher.hidden[first - 1].float()} if first else {}
    with autocast(runtime, config), capture_block_outputs(base, student_blocks) as hidden, \
            (capture_hidden_states(base) if regularizer else contextlib.nullcontext([])) as states, \
            started_at(base, first, seen):
        logits = model(input_ids=ids, use_cache=False).logits
    parts = {}
    if config.alpha > 0:
        parts["kd"] = teacher.kd(logits, config.temperature)
    if config.alpha < 1:
        parts["lm"] = lm_loss(logits, ids)
    if points:
        parts["hidden"] = torch.stack([hidden_loss(hidden[p.student_block], teacher.hidden[p.teacher_block])
                                       for p in points]).mean()
    if regularizer is not None:
        parts["cos"] = regularizer(states) / regularizer.weight
    loss = config.alpha * parts.get("kd", 0.0) + (1 - config.alpha) * parts.get("lm", 0.0)
    loss = loss + config.hidden_weight * parts.get("hidden", 0.0)
    if regularizer is not None:
        loss = loss + regularizer.weight * parts["cos"]
    parts["loss"] = loss
    return parts
