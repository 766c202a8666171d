"""Validating a quantized export against the fp32 PyTorch model, with measures that can fail.

Weight-only int8/int4 graphs cannot match PyTorch token for token, so they are held to bounds:
- perplexity on a short text (the held-out end of the calibration text, `split_text`: never a token
  calibration saw; its first `tokens` tokens, strided 512/256) may rise
  by at most `max_ppl_increase` over the PyTorch model's on the same tokens;
- on fresh windows from later in the same text, the share of positions whose top-1 token equals
  PyTorch's must be at least `min_top1`, and the mean KL(PyTorch || export) at most `max_kl`.
Without a tokenizer, random token ids stand in for the text (said in the report's notes).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressor.errors import CompressorError
from compressor.util.progress import status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityBounds:
    """What a quantized export must keep; defaults per precision in `DEFAULT_BOUNDS`."""

    max_ppl_increase: float  # relative: 0.02 is +2%
    min_top1: float
    max_kl: float  # nats per position
    tokens: int = 2048
    windows: int = 4
    window_len: int = 128

    def problems(self) -> list[str]:
        out = []
        if self.max_ppl_increase < 0:
            out.append(f"the perplexity bound must be >= 0, not {self.max_ppl_increase}")
        if not 0 <= self.min_top1 <= 1:
            out.append(f"the top-1 agreement bound must be in [0, 1], not {self.min_top1}")
        if self.tokens < 64:
            out.append(f"the perplexity text needs at least 64 tokens, not {self.tokens}")
        return out


DEFAULT_BOUNDS = {
    "int8": QualityBounds(max_ppl_increase=0.02, min_top1=0.90, max_kl=0.05),
    "int4": QualityBounds(max_ppl_increase=0.25, min_top1=0.70, max_kl=0.30),
}


@dataclass
class QualityReport:
    file: str
    precision: str
    bounds: dict
    perplexity_reference: float
    perplexity: float
    perplexity_increase: float
    top1_agreement: float
    mean_kl: float
    tokens: int
    positions: int
    passed: bool
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"perplexity {self.perplexity:.3f} vs PyTorch fp32 {self.perplexity_reference:.3f} "
                f"({100 * self.perplexity_increase:+.2f}%, bound +{100 * self.bounds['max_ppl_increase']:.1f}%), "
                f"top-1 agreement {self.top1_agreement:.3f} (bound >= {self.bounds['min_top1']:.2f}), "
                f"mean KL {self.mean_kl:.2e} nats (bound <= {self.bounds['max_kl']:.3g})")

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": "quantized", "summary": self.summary()}


class QualityError(CompressorError):
    """A quantized export lost more quality than its bounds allow."""


def _window_length(model, longest: int = 512) -> int:
    """512-token windows, or the model's context when shorter (fused rotary caches end there)."""
    config = model.config.get_text_config()
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or longest
    return min(longest, int(context))


# The end of the calibration text kept for validation (compressor.data.hold_out's rule).
HELD_OUT = 0.1


def split_text(data: Path | str | None) -> tuple[list[str], str]:
    """(calibration texts, held-out validation text) of `data` (None: the bundled text): the
    validation text is the final HELD_OUT of the characters, which calibration never reads."""
    from compressor.data import hold_out, load_texts

    kept, held = hold_out(load_texts(data), HELD_OUT)
    return [kept], held


def validation_text(data: Path | str | None, eval: Path | str | None = None) -> tuple[list[str], str]:
    """(calibration texts, validation text): `split_text(data)`, with the `eval` text (a file or folder, as
    --data) validated on instead of the held-out end when it is given."""
    from compressor.data import load_texts

    texts, held = split_text(data)
    return texts, ("\n\n".join(load_texts(eval)) if eval is not None else held)


def quality_tokens(model, tokenizer, count: int, text: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """`count` tokens of `text` (default: the held-out end of the bundled text), or random ids
    (with a note) without a tokenizer or when the text is too short."""
    notes = []
    if tokenizer is not None:
        from compressor.data import token_stream

        if text is not None:
            ids = token_stream(tokenizer, [text])[:count]
            if ids.numel() >= count:
                return ids, notes
            notes.append(f"the validation text has {ids.numel()} tokens, fewer than {count}: "
                         "validated on the held-out end of the bundled text instead")
        ids = token_stream(tokenizer, [split_text(None)[1]])[:count]
        if ids.numel() >= count:
            return ids, notes
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(0))
    return ids, [*notes, "no tokenizer (or too short a text): random token ids stand in for the text"]


@torch.no_grad()
def compare_quality(model, runner, tokenizer, precision: str, bounds: QualityBounds, file: str = "",
                    text: str | None = None) -> QualityReport:
    """Perplexity, top-1 agreement and KL of `runner` against the PyTorch `model` (see the module doc),
    on `text` (default: the held-out end of the bundled text)."""
    from compressor.evaluate.perplexity import perplexity, runner_logits

    start = time.perf_counter()
    fresh = bounds.windows * bounds.window_len
    ids, notes = quality_tokens(model, tokenizer, bounds.tokens + fresh, text)
    text, later = ids[: bounds.tokens], ids[bounds.tokens:]
    status(f"perplexity of the {precision} export vs PyTorch on {text.numel()} tokens")
    window = _window_length(model)
    reference = perplexity(model, text, max_length=window, stride=window // 2).perplexity
    got = perplexity(runner, text, max_length=window, stride=window // 2).perplexity
    agree, kl, positions = 0, 0.0, 0
    device = next(model.parameters()).device
    for w in range(bounds.windows):
        window = later[w * bounds.window_len:(w + 1) * bounds.window_len][None]
        ref = model(input_ids=window.to(device), use_cache=False).logits[0].float().cpu()
        out = torch.from_numpy(np.asarray(runner_logits(runner, window.numpy()), dtype=np.float32))[0]
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        p_log, q_log = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
        kl += float((p_log.exp() * (p_log - q_log)).sum())
        positions += ref.shape[0]
    increase = got / reference - 1
    top1, mean_kl = agree / positions, kl / positions
    passed = (math.isfinite(got) and increase <= bounds.max_ppl_increase and top1 >= bounds.min_top1
              and mean_kl <= bounds.max_kl)
    return QualityReport(file=file, precision=precision, bounds=asdict(bounds), perplexity_reference=reference,
                         perplexity=got, perplexity_increase=increase, top1_agreement=top1, mean_kl=mean_kl,
                         tokens=int(text.numel()), positions=positions, passed=passed,
                         seconds=round(time.perf_counter() - start, 2), notes=notes)


def validate_quantized(model, folder: Path, tokenizer, precision: str, bounds: QualityBounds | None = None,
                       allow_mismatch: bool = False, threads: int | None = None,
                       text: str | None = None) -> QualityReport:
    """compare_quality on the export in `folder` (on `text`, held out from calibration); writes
    validation.json; raises QualityError on a failure."""
    from compressor.export.runtime import OrtCausalLM
    from compressor.export.validate import VALIDATION_FILE
    from compressor.util.io import write_json

    bounds = bounds or DEFAULT_BOUNDS[precision]
    runner = OrtCausalLM(folder, threads=threads)
    report = compare_quality(model, runner, tokenizer, precision, bounds, file=str(runner.path), text=text)
    del runner
    write_json(Path(folder) / VALIDATION_FILE, report.to_dict())
    if report.passed:
        log.debug("quantized export within bounds: %s", report.summary())
    elif allow_mismatch:
        log.warning("the %s export is outside its bounds: %s (kept because of --allow-mismatch)",
                    precision, report.summary())
    else:
        raise QualityError(f"the {precision} export is outside its bounds: {report.summary()}; loosen them "
                           "(--max-ppl-increase, --min-top1, --max-kl), try another quantization, or "
                           "pass --allow-mismatch to keep it")
    return report
