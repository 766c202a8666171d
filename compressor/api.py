"""`compressor.compress`: the whole pipeline in one call, on a model object or a model path."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from compressor.errors import CompressorError


def compress(model, tokenizer=None, *, target_speedup: float | None = None, max_ppl_increase: float | None = None,
             out: Path | str | None = None, overwrite: bool = False, **settings):
    """Compress a model to a measured speedup (or the fastest within a perplexity budget); returns the Report.

    model: a directory, a .gguf file or 'smollm2-135m'; or a loaded causal LM (then pass its `tokenizer`;
        the model itself is left unchanged).
    target_speedup: e.g. 1.3, measured on `backend` ("onnxruntime" by default, also "torch", "tensorrt").
    max_ppl_increase: instead, a fraction (0.1 = 10 %): the most blocks removed within it.
    out: the run directory to write (reports, checkpoint, export, plan); None writes nothing, not even to
        compressor's cache (a model given by name may still be converted into it once, as load_model does).
    settings: any other field of compressor.pipeline.PipelineConfig (samples, seq_len, heal_steps, format, ...).
    """
    from compressor.pipeline import PipelineConfig, run_pipeline

    names = {f.name for f in fields(PipelineConfig)} - {"model", "target_speedup", "max_ppl_increase"}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise CompressorError(f"unknown setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
    loaded = not isinstance(model, (str, Path))
    if loaded and tokenizer is None:
        raise CompressorError("a loaded model needs its tokenizer: compress(model, tokenizer, ...)")
    label = _label(model) if loaded else str(model)
    cfg = PipelineConfig(model=label, target_speedup=target_speedup, max_ppl_increase=max_ppl_increase, **settings)
    if loaded:
        return run_pipeline(cfg, out, overwrite, model=model, tokenizer=tokenizer)
    return run_pipeline(cfg, out, overwrite)


def _label(model) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or type(model).__name__
