"""Whether a teacher can teach a student: the one check, for configs (before loading weights) and
for loaded models (where the depth matters too); and whether token windows fit the student."""

from __future__ import annotations

import torch

from compressor.adapters import get_adapter
from compressor.errors import CompressorError, DataError


def check_teacher(student, teacher, cut_from: int | None = None) -> None:
    """Refuse a teacher of another vocabulary or width (student, teacher: models or configs).

    cut_from: the depth the student was cut from; when given, the teacher (a model) must have that
    many blocks, since hidden-state targets are read at the student's cut points in its numbering.
    """
    s, t = _sizes(student), _sizes(teacher)
    problems = [f"{name} {t[name]} vs the student's {s[name]}" for name in ("vocabulary", "width") if s[name] != t[name]]
    if cut_from is not None:
        blocks = get_adapter(teacher).num_blocks(teacher)
        if blocks != cut_from:
            problems.append(f"{blocks} blocks vs the {cut_from} the student was cut from")
    if problems:
        raise CompressorError("the teacher does not match the student (" + "; ".join(problems) + "): "
                              "pass the unpruned model the student was made from as --teacher")


def _sizes(model_or_config) -> dict:
    """Vocabulary and width; of a loaded model, the vocabulary its LM head really has (it may differ
    from the config's after resizing)."""
    config = getattr(model_or_config, "config", model_or_config).get_text_config()
    vocab = getattr(config, "vocab_size", None)
    if isinstance(model_or_config, torch.nn.Module) and model_or_config.get_output_embeddings() is not None:
        vocab = model_or_config.get_output_embeddings().weight.shape[0]
    return {"vocabulary": vocab, "width": getattr(config, "hidden_size", None)}


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_windows(windows, vocab: int, what: str) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise DataError(f"{what} windows must be a LongTensor [windows, tokens]: build them with make_windows")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(f"no usable {what} windows (shape {tuple(windows.shape)}): give more text or a longer "
                        "--seq-len")
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise DataError(f"{what} windows hold token ids outside the model's vocabulary ({vocab}): "
                        "tokenize with the student's own tokenizer")
