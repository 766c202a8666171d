"""compressor: make transformer language models shallower and ship them to ONNX Runtime and TensorRT.

    import compressor
    report = compressor.compress("smollm2-135m", target_speedup=1.3, out="run")   # everything, one call

or step by step (each verb is a plain function; the ones ending in _ change the model in place):

    model, tokenizer = compressor.load_model("smollm2-135m")
    windows = compressor.make_windows(tokenizer, compressor.load_texts(None), 64, 256)
    profile = compressor.profile(model, windows)              # linearity of every block
    plan = compressor.plan_blocks(model, windows, 6, profile=profile)[6]
    compressor.apply_plan_(model, plan)                      # or prune_(model, [3, 5]) / linearize_
    compressor.heal_(model, teacher, windows)                # distil from the unpruned model
    compressor.export_model(model, tokenizer, "out-dir")     # ONNX (or TensorRT), validated
    compressor.bench(model, other)                           # latency side by side

Importing the package is light: the verbs load their modules (and onnx, onnxruntime, peft,
matplotlib, TensorRT) only when called.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# verb -> (module, attribute). Names avoid the subpackages' (calibrate, plan, heal, export, report):
# an imported subpackage becomes an attribute of the package and would hide a verb of the same name.
_VERBS = {
    "compress": ("compressor.api", "compress"),
    "load_model": ("compressor.loading", "load_model"),
    "load_texts": ("compressor.calibrate.data", "load_texts"),
    "make_windows": ("compressor.calibrate.data", "make_windows"),
    "profile": ("compressor.calibrate.profile", "calibrate"),
    "plan_blocks": ("compressor.select", "plan_blocks"),
    "apply_plan_": ("compressor.plan", "apply_plan_"),
    "linearize_": ("compressor.plan", "apply_plan_"),
    "prune_": ("compressor.surgery", "drop_blocks_"),
    "heal_": ("compressor.heal.train", "heal"),
    "export_model": ("compressor.export.pipeline", "export_model"),
    "bench": ("compressor.evaluate.benchmark", "run_bench"),
    "perplexity": ("compressor.evaluate.perplexity", "perplexity"),
    "HealConfig": ("compressor.heal.config", "HealConfig"),
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
