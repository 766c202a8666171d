"""`make setup`'s last step: import what the tool and its tests import, so that Python byte-compiles
those modules once, at set-up (run with PYTHONDONTWRITEBYTECODE unset).

pip installs with --no-compile: byte-compiling every file of every wheel costs about 40 s of set-up,
and most of torch and transformers is never imported. Where PYTHONDONTWRITEBYTECODE is set (many CI
images), nothing would then cache the compiled modules, and every process of the test suite would
compile torch again; this step leaves the modules that are used compiled, and only those.
"""

import compileall
import importlib
import importlib.util
import os

# Large packages, compiled as far as they are imported: most of torch and transformers never is.
IMPORTED = [
    "compressor.cli", "compressor.pipeline.run", "compressor.export.run", "compressor.heal", "compressor.quantize",
    "compressor.report", "torch.onnx", "torch.export", "torch.distributed.run", "onnx", "onnxscript", "onnxruntime",
    "onnxruntime_genai.models.builder", "peft", "matplotlib.pyplot", "gguf", "safetensors.torch", "accelerate",
    "pytest", "xdist",
]
# Packages compiled whole: small, or imported in pieces that are hard to name (pytest's plugins, the
# rank processes' torch.distributed).
WHOLE = [
    "compressor", "_pytest", "xdist", "execnet", "pydantic", "anyio", "annotated_types", "typing_inspection", "PIL",
    "typer", "click", "rich", "torch.distributed", "numpy",
]


def main() -> None:
    from compressor.adapters import ADAPTERS

    for name in IMPORTED:
        _import(name)
    for family in ADAPTERS:  # the transformers model of every family the adapter table claims
        _import(f"transformers.models.{family}.modeling_{family}")
    for name in WHOLE:
        spec = _find(name)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                compileall.compile_dir(folder, quiet=1, workers=os.cpu_count() or 1)


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except ImportError:  # a parent package that is not installed
        return None


def _import(name: str) -> None:
    """Import `name` when it is installed (`make setup EXTRAS=...` may leave an extra out)."""
    if _find(name) is not None:
        importlib.import_module(name)


if __name__ == "__main__":
    main()
