"""Healing's schedule: the window order, the learning rate, and fitting the steps to --max-minutes."""

from __future__ import annotations

import logging
import math

import torch

from compressor.errors import CompressorError
from compressor.heal.config import HealConfig
from compressor.heal.distributed import Runtime

log = logging.getLogger(__name__)

TIMING_STEPS = 3  # steps timed before a --max-minutes run re-plans its schedule to end in time
# ... and it re-plans once more after this many, from the steps since the first re-plan: the first steps
# run slower (allocator and thread-pool warm-up: 5.9 s against 4.4 s later on SmolLM2), and a schedule
# fitted to them alone ended a 30-minute heal after 21.
STEADY_STEPS = 4 * TIMING_STEPS

def training_budget(config: HealConfig, spent: float, eval_seconds: float, seconds_before: float):
    """Seconds left for training: --max-minutes bounds the whole run, evaluation after it included."""
    if config.max_minutes is None:
        return None
    left = config.max_minutes * 60 - spent - eval_seconds - seconds_before
    if left <= 0:
        raise CompressorError(f"--max-minutes {config.max_minutes} is spent before training starts "
                              f"({spent:.0f} s on the teacher and evaluation): allow more time")
    return left


class WindowOrder:
    """Which window comes at each global position: a fresh seeded permutation every epoch.

    A pure function of (seed, position), so a resumed run and every rank agree on the order.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs = {epoch: torch.randperm(self.n, generator=g)}
        return self._epochs[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm(i // self.n)[i % self.n] for i in range(start, start + count)])


class StepPlan:
    """The number of steps planned; a --max-minutes run may shorten it once, after timing a few steps."""

    def __init__(self, planned: int):
        self.planned = planned

    def steps(self, start: int):
        step = start
        while step < self.planned:
            yield step
            step += 1


def lr_at(step: int, planned: int, config: HealConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr_ratio * lr at the planned end."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, planned - config.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def agree(runtime: Runtime, seconds: float) -> float:
    """Every rank must stop and re-plan at the same step: use the slowest rank's clock."""
    if runtime.world_size == 1:
        return seconds
    return float(runtime.all_reduce(torch.tensor(seconds, dtype=torch.float64), op="max"))


def replan(planned: int, done: int, seconds_per_step: float, seconds_left: float, most: int) -> int:
    """The steps that fit in the time left at `seconds_per_step`, at most `most` (the steps asked for)."""
    fits = min(most, done + int(0.97 * seconds_left / seconds_per_step))
    if fits != planned:
        log.info("--max-minutes allows about %d of %d steps (%.2f s/step): the schedule ends there",
                 fits, most, seconds_per_step)
    return max(done, fits)


class LossSums:
    """Loss terms summed over micro-batches between two log lines (reduced across ranks when logged)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.totals: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, parts: dict) -> None:
        for k, v in parts.items():
            self.totals[k] = self.totals.get(k, 0.0) + v.detach().double()
        self.count += 1

    def report(self, runtime: Runtime, step: int, optimizer, tokens_per_second: float) -> dict:
        names = sorted(self.totals)
        values = torch.stack([torch.as_tensor(self.totals[k]) for k in names]).to(runtime.device)
        count = runtime.all_reduce(torch.tensor(float(self.count), dtype=torch.float64, device=runtime.device))
        values = runtime.all_reduce(values) / count
        row = {"step": step, **{k: round(float(v), 5) for k, v in zip(names, values)},
               "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens_per_second, 1)}
        self.reset()
        return row


def log_line(row: dict, planned: int) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("kd", "lm", "hidden", "cos") if k in row)
    return (f"step {row['step']}/{planned} loss {row['loss']:.4f} ({terms}) lr {row['lr']:.2e} "
            f"{row['tokens_per_s']:.0f} tok/s")
