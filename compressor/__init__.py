"""compressor: make transformer language models shallower and ship them to ONNX Runtime and TensorRT.

    import compressor
    report = compressor.compress("smollm2-135m", target_speedup=1.3, out="run")   # everything, one call

or step by step (each verb is a plain function; the ones ending in _ change the model in place):

    model, tokenizer = compressor.load_model("smollm2-135m")
    windows = compressor.make_windows(tokenizer, compressor.load_texts(None), 64, 256)
    profile = compressor.profile(model, windows)              # linearity of every block
    plan = compressor.plan_blocks(model, windows, 6, profile=profile)[6]
    compressor.apply_plan_(model, plan)                      # or prune_(model, [3, 5])
    compressor.linearize_(model, "12-15", windows)           # fit a linear map for blocks you name
    compressor.heal_(model, teacher, windows)                # distil from the unpruned model
    compressor.export_model(model, tokenizer, "out-dir")     # ONNX (or TensorRT), validated
    compressor.quantize_onnx(src, dst, compressor.QuantConfig(bits=8))  # weight-only int8/int4
    compressor.bench(model, other)                           # latency side by side

Importing the package is light: the verbs load their modules (and onnx, onnxruntime, peft,
matplotlib, TensorRT) only when called.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# verb -> (module, attribute). Names avoid the subpackages' (calibrate, select, surgery, heal, quantize, export,
# evaluate, pipeline, report, util):
# an imported subpackage becomes an attribute of the package and would hide a verb of the same name.
_VERBS = {
    "compress": ("compressor.api", "compress"),
    "load_model": ("compressor.loading", "load_model"),
    "load_texts": ("compressor.data", "load_texts"),
    "make_windows": ("compressor.data", "make_windows"),
    "profile": ("compressor.calibrate.profile", "calibrate"),
    "plan_blocks": ("compressor.select.search", "plan_blocks"),
    "compare_strategies": ("compressor.select.compare", "compare_strategies"),
    "apply_plan_": ("compressor.surgery.plan", "apply_plan_"),
    "linearize_": ("compressor.select.linear", "linearize_"),
    "prune_": ("compressor.surgery.edit", "drop_blocks_"),
    "heal_": ("compressor.heal.train", "heal"),
    "export_model": ("compressor.export.run", "export_model"),
    "quantize_onnx": ("compressor.quantize.graph", "quantize_onnx"),
    "bench": ("compressor.evaluate.benchmark", "run_bench"),
    "perplexity": ("compressor.evaluate.perplexity", "perplexity"),
    "HealConfig": ("compressor.heal.config", "HealConfig"),
    "QuantConfig": ("compressor.quantize.config", "QuantConfig"),
    "Report": ("compressor.report.schema", "Report"),
    "PipelineConfig": ("compressor.pipeline.config", "PipelineConfig"),
    "CompressorError": ("compressor.errors", "CompressorError"),
}

__all__ = ["__version__", *_VERBS]  # noqa: PLE0604 (the verbs are strings: the keys of _VERBS)


def __getattr__(name: str):
    if name not in _VERBS:
        raise AttributeError(f"module 'compressor' has no attribute '{name}'")
    module, attr = _VERBS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(__all__)
