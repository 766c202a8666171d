"""Checking an exported model against PyTorch: logits and cache on fresh inputs, then greedy decoding.

Cases cover batch 1 and >1, an empty and a non-empty past, and left padding. Differences are
measured only where the attention mask is 1 (padded positions carry no meaning). `rel` is the max
absolute difference divided by the largest reference magnitude in the same tensors.

Greedy decoding (32 tokens by default) runs PyTorch through transformers' own cache, not the
export wrapper, so it is an independent reference. A first mismatch where PyTorch's top-2 logits
differ by less than the tolerance is a numerical tie, reported but not failed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.errors import CompressorError
from compressor.export.onnx import (
    OPTIMIZED_FILE,
    CausalLMWithFlatCache,
    empty_cache_like,
)
from compressor.export.runtime import positions_from_mask
from compressor.util.io import write_json
from compressor.util.kvcache import cache_kwarg, cache_of
from compressor.util.progress import status, track

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
# (name, batch, new tokens, past tokens, left padding)
CASES = [
    ("prefill", 1, 7, 0, False),
    ("prefill, batch 2, left-padded", 2, 6, 0, True),
    ("decode, batch 3, left-padded past", 3, 1, 8, True),
    ("chunk after past, batch 2", 2, 4, 5, False),
    ("decode, batch 2", 2, 1, 6, False),
    ("chunk after past", 1, 4, 5, False),
]
GREEDY_PROMPT = "The history of the city begins"


@dataclass(frozen=True)
class Tolerance:
    """Passes when max_abs <= abs + rel * (largest reference magnitude)."""

    abs: float
    rel: float

    def allows(self, max_abs: float, scale: float) -> bool:
        return bool(np.isfinite(max_abs)) and max_abs <= self.abs + self.rel * scale


TOLERANCES = {"float32": Tolerance(abs=1e-3, rel=1e-4), "float16": Tolerance(abs=2e-2, rel=1e-2)}


class ExportMismatchError(CompressorError):
    """The exported model does not compute what the PyTorch model computes."""


@dataclass
class CaseResult:
    name: str
    batch: int
    seq: int
    past: int
    left_padding: bool
    logits_max_abs: float
    logits_max_rel: float
    present_max_abs: float
    present_max_rel: float
    passed: bool


@dataclass
class GreedyResult:
    tokens: int
    matched: int
    first_mismatch: int | None
    margin_at_mismatch: float | None
    required: bool
    passed: bool


@dataclass
class ValidationReport:
    file: str
    runtime: str
    dtype: str
    tolerance: dict
    cases: list[CaseResult]
    greedy: GreedyResult | None
    passed: bool
    seconds: float
    optimized: ValidationReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def logits_max_abs(self) -> float:
        return max((c.logits_max_abs for c in self.cases), default=0.0)

    @property
    def present_max_abs(self) -> float:
        return max((c.present_max_abs for c in self.cases), default=0.0)

    @property
    def all_passed(self) -> bool:
        return self.passed and (self.optimized is None or self.optimized.all_passed)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["logits_max_abs"], data["present_max_abs"] = self.logits_max_abs, self.present_max_abs
        if self.optimized is not None:
            data["optimized"] = self.optimized.to_dict()
        return data

    def summary(self) -> str:
        greedy = ""
        if self.greedy is not None:
            greedy = f", greedy {self.greedy.matched}/{self.greedy.tokens} tokens identical"
        text = (f"{Path(self.file).name}: max |logits diff| {self.logits_max_abs:.2e}, "
                f"max |cache diff| {self.present_max_abs:.2e} (tolerance {self.tolerance['abs']:g} "
                f"+ {self.tolerance['rel']:g} x scale){greedy}")
        return text + (f"; {self.optimized.summary()}" if self.optimized is not None else "")


def to_numpy(value) -> np.ndarray:
    """numpy from numpy, torch tensors (any device) or ONNX Runtime OrtValues."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value.numpy())


def _diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """max abs difference, max abs reference, their ratio."""
    if ref.size == 0:
        return 0.0, 0.0, 0.0
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(ref - got)))
    scale = float(np.max(np.abs(ref)))
    return max_abs, scale, max_abs / scale if scale else max_abs


def _padded_mask(batch: int, length: int, pad: bool) -> np.ndarray:
    """Ones, with row r left-padded by r positions (at most length - 1) when `pad`."""
    mask = np.ones((batch, length), dtype=np.int64)
    if pad:
        for row in range(1, batch):
            mask[row, : min(row, length - 1)] = 0
    return mask


@torch.no_grad()
def _run_case(model, runner, case, tol: Tolerance, gen: torch.Generator) -> CaseResult:
    name, batch, seq, past, pad = case
    device = next(model.parameters()).device
    wrapper = CausalLMWithFlatCache(model).eval()
    vocab = model.get_input_embeddings().num_embeddings
    prefix_mask = _padded_mask(batch, past, pad) if past else np.ones((batch, 0), dtype=np.int64)
    past_torch = empty_cache_like(model, batch, device)
    if past:
        prefix = torch.randint(3, vocab, (batch, past), generator=gen).to(device)
        prefix_pos = positions_from_mask(prefix_mask, past)
        past_torch = list(wrapper(prefix, _t(prefix_mask, device), _t(prefix_pos, device), past_torch)[1:])
    new_mask = _padded_mask(batch, seq, pad and not past)
    mask = np.concatenate([prefix_mask, new_mask], axis=1)
    positions = positions_from_mask(mask, seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    ref_logits, *ref_present = wrapper(ids.to(device), _t(mask, device), _t(positions, device), past_torch)
    past_np = [p.float().cpu().numpy().astype(runner.dtype) for p in past_torch]
    logits, present = runner.forward(ids.numpy(), mask, positions, past_np)

    valid_q, valid_kv = new_mask.astype(bool), mask.astype(bool)
    l_abs, l_scale, l_rel = _diff(to_numpy(ref_logits)[valid_q], to_numpy(logits)[valid_q])
    p_abs = p_scale = 0.0
    for ref, got in zip(ref_present, present):
        # [batch, heads, kv, dim] -> [batch, kv, heads, dim] so the mask selects positions
        r = np.moveaxis(to_numpy(ref), 2, 1)[valid_kv]
        g = np.moveaxis(to_numpy(got), 2, 1)[valid_kv]
        a, s, _ = _diff(r, g)
        p_abs, p_scale = max(p_abs, a), max(p_scale, s)
    passed = tol.allows(l_abs, l_scale) and tol.allows(p_abs, p_scale) and len(present) == len(ref_present)
    return CaseResult(name, batch, seq, past, pad, l_abs, l_rel, p_abs, p_abs / p_scale if p_scale else p_abs, passed)


def _t(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


@torch.no_grad()
def torch_greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[tuple[float, float]]]:
    """Greedy tokens through transformers' own cache, and (top-2 margin, top logit) at each step."""
    kw = cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    tokens, margins = [], []
    for _ in range(new_tokens):
        last = out.logits[0, -1].float()
        top2 = torch.topk(last, 2).values
        nxt = int(last.argmax())
        tokens.append(nxt)
        margins.append((float(top2[0] - top2[1]), float(top2[0].abs())))
        step = torch.tensor([[nxt]], device=prompt.device)
        out = model(input_ids=step, use_cache=True, **{kw: cache_of(out)})
    return tokens, margins


def prompt_ids(model, tokenizer=None, seed: int = 0) -> torch.Tensor:
    """A short text prompt through the tokenizer, or random tokens without one."""
    if tokenizer is not None:
        try:
            ids = tokenizer(GREEDY_PROMPT, return_tensors="pt")["input_ids"]
            if ids.shape[1] >= 3:
                return ids
        except (ValueError, TypeError, KeyError) as exc:  # cannot encode plain text: use random ids
            log.debug("tokenizer failed on the greedy prompt: %s", exc)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(seed))


def _greedy(model, runner, prompt: torch.Tensor, new_tokens: int, tol: Tolerance, required: bool):
    device = next(model.parameters()).device
    ref, margins = torch_greedy(model, prompt.to(device), new_tokens)
    got = runner.generate_greedy(prompt.numpy(), new_tokens)[0, prompt.shape[1]:].tolist()
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    matched = new_tokens if first is None else first
    margin, top = (None, 0.0) if first is None else margins[first]
    tie = margin is not None and margin <= tol.abs + tol.rel * top
    passed = first is None or tie or not required
    return GreedyResult(new_tokens, matched, first, margin, required, passed), tie


def validate_runner(model, runner, dtype: str, tokenizer=None, greedy_tokens: int = 32, seed: int = 0,
                    file: str = "", runtime: str = "") -> ValidationReport:
    """Compare `runner` (an OrtCausalLM or TrtCausalLM) with the PyTorch `model` on fresh inputs."""
    start = time.perf_counter()
    tol = TOLERANCES.get(dtype, TOLERANCES["float16"])
    gen = torch.Generator().manual_seed(seed)
    model_was_training = model.training
    model.eval()
    accepts = getattr(runner, "accepts", None) or (lambda batch, seq, past, padded=False: True)
    chosen = [c for c in CASES if accepts(c[1], c[2], c[3], c[4])]
    why = getattr(runner, "refusal_note", "outside the engine's profile")
    notes = [f"case '{c[0]}' skipped: {why}" for c in CASES if c not in chosen]
    prompt = prompt_ids(model, tokenizer, seed)
    if greedy_tokens and not accepts(1, prompt.shape[1], prompt.shape[1] + greedy_tokens):
        notes.append("greedy generation skipped: the prompt plus new tokens exceed the engine's profile")
        greedy_tokens = 0
    try:
        cases = [_run_case(model, runner, case, tol, gen)
                 for case in track(chosen, len(chosen), f"validating {Path(file).name or runtime}")]
        greedy = None
        if greedy_tokens:
            greedy, tie = _greedy(model, runner, prompt, greedy_tokens, tol, required=dtype == "float32")
            if tie:
                notes.append(f"greedy tokens differ first at step {greedy.first_mismatch}, where PyTorch's "
                             f"top two logits are {greedy.margin_at_mismatch:.2e} apart (a numerical tie)")
    finally:
        model.train(model_was_training)
    passed = all(c.passed for c in cases) and (greedy is None or greedy.passed)
    return ValidationReport(file=file, runtime=runtime, dtype=dtype, tolerance=dataclasses.asdict(tol),
                            cases=cases, greedy=greedy, passed=passed,
                            seconds=round(time.perf_counter() - start, 2), notes=notes)


def validate_onnx(model, onnx_dir: Path | str, tokenizer=None, allow_mismatch: bool = False,
                  greedy_tokens: int = 32, threads: int | None = None, seed: int = 0,
                  providers: list[str] | None = None) -> ValidationReport:
    """Validate model.onnx in `onnx_dir` (and model_optimized.onnx when present) against `model`.

    Writes validation.json into the folder. A failure raises ExportMismatchError with the numbers,
    unless allow_mismatch, which logs a warning and returns the failed report.
    """
    from compressor.export.onnx import ONNX_FILE
    from compressor.export.runtime import OrtCausalLM

    onnx_dir = Path(onnx_dir)
    folder = onnx_dir if onnx_dir.is_dir() else onnx_dir.parent
    files = [folder / ONNX_FILE] if onnx_dir.is_dir() else [onnx_dir]
    if onnx_dir.is_dir() and (folder / OPTIMIZED_FILE).is_file():
        files.append(folder / OPTIMIZED_FILE)
    reports = []
    for path in files:
        status(f"validating {path.name} against PyTorch")
        runner = OrtCausalLM(path, threads=threads, providers=providers)
        dtype = "float16" if runner.dtype == np.float16 else "float32"
        reports.append(validate_runner(model, runner, dtype, tokenizer, greedy_tokens, seed, file=str(path),
                                       runtime="onnxruntime " + runner.providers[0]))
        del runner
    report = reports[0]
    report.optimized = reports[1] if len(reports) > 1 else None
    write_json(folder / VALIDATION_FILE, report.to_dict())
    check(report, allow_mismatch)
    return report


def check(report: ValidationReport, allow_mismatch: bool = False) -> None:
    """Raise ExportMismatchError for a failed report (or warn, with allow_mismatch)."""
    if report.all_passed:
        log.debug("validation passed: %s", report.summary())
        return
    failed = [c.name for r in (report, report.optimized) if r is not None for c in r.cases if not c.passed]
    greedy = [r.greedy for r in (report, report.optimized) if r is not None and r.greedy and not r.greedy.passed]
    what = (f"cases failing: {', '.join(failed)}; " if failed else "") + (
        f"greedy tokens differ from step {greedy[0].first_mismatch}; " if greedy else "")
    message = f"the export does not match PyTorch: {what}{report.summary()}"
    if allow_mismatch:
        log.warning("%s (kept because of --allow-mismatch)", message)
        return
    raise ExportMismatchError(message + ": pass --allow-mismatch to keep it anyway, or report the model")
