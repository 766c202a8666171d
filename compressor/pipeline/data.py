"""The run's data: calibration windows, healing windows and held-out evaluation tokens, by one split rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.data import hold_out, load_texts, other_source, text_name, token_stream, windows_of
from compressor.errors import DataError
from compressor.evaluate import load_eval_tokens, perplexity

HOLD_OUT = 0.15  # the end of the calibration text scores perplexity when no --eval file is given
PPL_WINDOW, PPL_STRIDE = 512, 256


@dataclass
class Data:
    calibration: torch.Tensor             # [samples, seq_len]
    healing: torch.Tensor | None          # healing's own windows from the same text (None: no healing)
    evaluation: dict[str, torch.Tensor]   # name -> 1-D token ids; the first one decides, the others are reported


def load_data(cfg, tokenizer) -> Data:
    """Windows from the kept part of the text (data.hold_out's rule); evaluation from --eval, or else the
    held-out end of the calibration text and a bundled text of another source (`data.other_source`)."""
    from compressor.heal import HealConfig

    kept, held = hold_out(load_texts(cfg.data, cfg.field), HOLD_OUT)
    stream = token_stream(tokenizer, [kept])
    windows = windows_of(stream, cfg.samples, cfg.seq_len, cfg.seed)
    # Healing draws its own windows from the same text: as many as its steps can use, so it does not
    # cycle over the few calibration windows.
    wanted = max(cfg.samples, cfg.heal_steps * HealConfig.batch_size)
    healing = windows_of(stream, wanted, cfg.seq_len, cfg.seed + 1, at_most=True) if cfg.heal_steps > 0 else None
    evaluation = {Path(path).name: load_eval_tokens(tokenizer, path, cfg.field, cfg.eval_max_tokens)
                  for path in cfg.eval}
    if not evaluation:
        ids = tokenizer(held, return_tensors="pt").input_ids[0][: cfg.eval_max_tokens]
        if ids.numel() < 2:
            raise DataError("the held-out part of the calibration text is empty: pass --eval FILE")
        evaluation[f"held-out {text_name(cfg.data)} (calibration source)"] = ids
        name, texts = other_source(cfg.data)
        evaluation[f"{name} (other source)"] = token_stream(tokenizer, _leading(texts, 8 * cfg.eval_max_tokens))[
            : cfg.eval_max_tokens]
    return Data(windows, healing, evaluation)


def _leading(texts: list[str], chars: int) -> list[str]:
    """The first documents of `texts` up to about `chars` characters (more than the tokens wanted need)."""
    kept, total = [], 0
    for text in texts:
        if total >= chars:
            break
        kept.append(text)
        total += len(text)
    return kept


def perplexities(model, evaluation: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity of `model` (a torch model, or a benchmark backend: then through its runtime) on each
    evaluation text (strided windows)."""
    return {name: perplexity(model, ids, max_length=PPL_WINDOW, stride=PPL_STRIDE).perplexity
            for name, ids in evaluation.items()}
