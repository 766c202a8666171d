"""What a run delivers besides its report: the compressed checkpoint and its export."""

from __future__ import annotations

from compressor.pipeline.measure import export_to
from compressor.util.io import atomic_dir

CHECKPOINT = "model"


def save_stage(run, model) -> None:
    from compressor.surgery.edit import save_checkpoint

    with atomic_dir(run.work / CHECKPOINT, overwrite=True) as tmp:
        save_checkpoint(model, run.tokenizer, tmp)


def export_stage(run, model, precision: str) -> dict[str, dict]:
    """work/FORMAT with the validated export at `precision` (an ONNX model, or an ONNX model and its
    TensorRT engine); a quantized export is held to its quality bounds against `model`."""
    fmt = run.cfg.format
    if fmt == "none":
        return {}
    return {fmt: export_to(run, model, run.work / fmt, fmt, validate=True, precision=precision).to_dict()}
