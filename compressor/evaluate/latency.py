"""Timing prefill and decode the way benchmarking tools do.

- Warm-up trials first (not timed), then timed trials until both a minimum number of samples
  and a minimum measured time are reached.
- Several models are measured in alternation, one trial each per round, so that drift in the
  machine (other processes, clocks, thermals) hits all of them equally; the order flips every
  round (A B, B A, A B ...) so that neither model always runs right after the other.
- On a GPU, torch work is timed with CUDA events after a synchronize; elsewhere with
  `time.perf_counter`, a monotonic clock.
- A prefill sample is one forward pass over a batch x sequence of random tokens (fixed seed),
  building the KV cache. A decode sample is one new token with the cache, after a prompt whose
  prefill is not timed; samples from every position of the generated continuation are pooled,
  and models alternate token by token, so drift cancels at the scale of one step. The prompt is
  prefilled once per model: each pass over the continuation restarts from a copy of that state (a
  512-token prefill costs as much as dozens of decoded tokens, and its cache is the same each time).
- A model that has its samples and time stops; the others go on alternating. Otherwise the slowest
  model would be timed for as long as the fastest one needs to fill its time (many times its own).
"""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from compressor.errors import CompressorError
from compressor.evaluate.stats import LatencyStats, summarize

log = logging.getLogger(__name__)

Trial = Callable[[bool], list[float]]  # trial(warmup) -> sample times in ms


@dataclass(frozen=True)
class PrefillSpec:
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"


@dataclass(frozen=True)
class DecodeSpec:
    batch: int
    prompt: int
    new_tokens: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.prompt}+{self.new_tokens}"


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2  # untimed trials per model and workload
    min_runs: int = 10  # timed samples: prefill passes, or decoded tokens
    min_seconds: float = 2.0  # measured time per model and workload
    seed: int = 0
    warmup_decode_tokens: int = 16  # tokens per warm-up decode trial

    def to_dict(self) -> dict:
        return asdict(self)


def parse_prefill(spec: str) -> list[PrefillSpec]:
    """"1x128,1x512" -> prefill shapes (batch x sequence). Empty or "none": no prefill timing."""
    if spec.strip().lower() in ("", "none"):
        return []
    shapes = []
    for part in spec.split(","):
        try:
            batch, seq = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise CompressorError(f"cannot read prefill shape '{part}': write BATCHxSEQ, e.g. 1x512") from None
        if batch < 1 or seq < 1:
            raise CompressorError(f"prefill shape '{part}' must have a batch and sequence of at least 1")
        shapes.append(PrefillSpec(batch, seq))
    return shapes


def parse_decode(spec: str) -> list[DecodeSpec]:
    """"128+64" or "4x128+64" -> decode runs (batch x prompt + new tokens). Empty or "none": none."""
    if spec.strip().lower() in ("", "none"):
        return []
    runs = []
    for part in spec.split(","):
        text = part.strip().lower()
        try:
            batch_text, _, rest = text.rpartition("x")
            prompt, new = (int(x) for x in rest.split("+"))
            batch = int(batch_text) if batch_text else 1
        except ValueError:
            raise CompressorError(f"cannot read decode run '{part}': write PROMPT+NEW, e.g. 128+64") from None
        if batch < 1 or prompt < 1 or new < 1:
            raise CompressorError(f"decode run '{part}' needs a batch, prompt and new tokens of at least 1")
        runs.append(DecodeSpec(batch, prompt, new))
    return runs


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(vocab_size, 1), (batch, seq), generator=generator)


def timed(backend, fn: Callable[[], object]) -> tuple[float, object]:
    """Run fn once; return (milliseconds, result) with the backend's work completed."""
    if backend.cuda_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), result
    backend.sync()
    t0 = time.perf_counter()
    result = fn()
    backend.sync()
    return (time.perf_counter() - t0) * 1000.0, result


def prefill_trial(backend, spec: PrefillSpec, seed: int = 0) -> Trial:
    ids = random_tokens(backend.vocab_size, spec.batch, spec.seq, seed)

    def trial(warmup: bool) -> list[float]:
        ms, _ = timed(backend, lambda: backend.prefill(ids))
        return [ms]

    return trial


def decode_trial(backend, spec: DecodeSpec, seed: int = 0, warmup_tokens: int = 16) -> Trial:
    """One timed decoding step per call, so that models alternate token by token.

    The prompt's prefill is not timed; after `new_tokens` steps the next call starts over from a
    copy of the prompt's state (prefilled once), so samples cover positions prompt .. prompt +
    new_tokens - 1 in turn. A warm-up call decodes `warmup_tokens` tokens and leaves the next timed
    call to start afresh.
    """
    prompt = random_tokens(backend.vocab_size, spec.batch, spec.prompt, seed)
    cursor = {"prompt": None, "state": None, "made": spec.new_tokens}

    def step() -> float:
        if cursor["made"] >= spec.new_tokens:
            if cursor["prompt"] is None:
                cursor["prompt"] = backend.prefill(prompt)
            # a copy: a torch cache grows in place as it decodes
            cursor["state"], cursor["made"] = copy.deepcopy(cursor["prompt"]), 0
        ms, cursor["state"] = timed(backend, lambda: backend.decode_step(cursor["state"]))
        cursor["made"] += 1
        return ms

    def trial(warmup: bool) -> list[float]:
        if not warmup:
            return [step()]
        for _ in range(min(spec.new_tokens, warmup_tokens)):
            step()
        cursor["made"] = spec.new_tokens
        return []

    return trial


def measure(trials: list[Trial], timing: TimingConfig) -> list[list[float]]:
    """Samples (ms) of each trial, run in alternation; each stops once it has enough samples and time."""
    for _ in range(timing.warmup):
        for trial in trials:
            trial(True)
    samples: list[list[float]] = [[] for _ in trials]
    spent = [0.0] * len(trials)
    order = list(range(len(trials)))

    def pending(i: int) -> bool:
        return len(samples[i]) < timing.min_runs or spent[i] < timing.min_seconds * 1000.0

    while any(pending(i) for i in order):
        for i in [i for i in order if pending(i)]:
            taken = trials[i](False)
            samples[i].extend(taken)
            spent[i] += sum(taken)
        order.reverse()  # A B, B A, A B ...: neither model always runs first in a round
    return samples


def prefill_entry(spec: PrefillSpec, samples: list[float]) -> dict:
    return {"batch": spec.batch, "seq": spec.seq, **summarize(samples, spec.batch * spec.seq).to_dict()}


def decode_entry(spec: DecodeSpec, samples: list[float]) -> dict:
    """Per-token statistics; tokens_per_s counts every sequence of the batch."""
    stats: LatencyStats = summarize(samples, spec.batch)
    return {"batch": spec.batch, "prompt": spec.prompt, "new_tokens": spec.new_tokens, **stats.to_dict()}


def memory_report(device: str | None = None) -> dict:
    """Peak resident memory of this process (all models it loaded) and, on CUDA, peak allocated."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report: dict = {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}
    try:
        import psutil

        report["rss_bytes"] = psutil.Process().memory_info().rss
    except ImportError:
        pass
    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        report["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        report["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return report
