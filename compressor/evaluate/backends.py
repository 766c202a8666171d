"""Inference backends behind one small interface, and a registry that names them.

A Backend runs three things the benchmark times or scores:
- `prefill(ids)`: one forward pass over a prompt that builds a KV cache and produces logits for
  every position (what an exported ONNX model computes), then picks the next token greedily.
  Returns the decoding state.
- `decode_step(state)`: one new token with the cache, greedy. Returns the next state.
- `logits(ids)`: logits [B, T, V] of whole windows from an empty cache, for perplexity.

Each backend reports `versions()` and `settings()` (threads, dtype, providers ...) so numbers are
never separated from what produced them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import torch

from compressor.errors import CompressorError, ModelLoadError, require
from compressor.util.io import dir_size
from compressor.util.kvcache import cache_kwarg, new_cache

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    device: str
    num_blocks: int
    vocab_size: int
    tokenizer: Any  # a tokenizer found next to the model, or None
    cuda_events: bool  # time with CUDA events (work is queued on torch's CUDA stream)

    def versions(self) -> dict[str, str]: ...
    def settings(self) -> dict[str, Any]: ...
    def size_bytes(self) -> int | None: ...
    def prefill(self, input_ids: torch.Tensor) -> Any: ...
    def decode_step(self, state: Any) -> Any: ...
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...  # undo process-wide settings the backend made (torch threads)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Backend]
    describe: str


BACKENDS: dict[str, _Entry] = {}


def register_backend(name: str, describe: str):
    """Class decorator: make a backend available to `get_backend` and `compress bench --backend`."""

    def decorate(factory):
        BACKENDS[name] = _Entry(factory, describe)
        return factory

    return decorate


def get_backend(name: str, model, device: str = "cpu", threads: int | None = None, **options) -> Backend:
    """Open `model` (a spec, a path, or for torch a loaded module) on the named backend.

    options: dtype, compile, allow_pickle (torch); providers (onnxruntime).
    """
    if name == "auto":
        name = detect_backend(model)
    try:
        entry = BACKENDS[name]
    except KeyError:
        choices = ", ".join(f"{n} ({e.describe})" for n, e in sorted(BACKENDS.items()))
        raise CompressorError(f"unknown backend '{name}': choose one of {choices}") from None
    return entry.factory(model, device=device, threads=threads, **options)


def detect_backend(model) -> str:
    """onnxruntime for a directory with model.onnx or a .onnx file, tensorrt for an engine, else torch."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
            return "onnxruntime"
        if path.suffix in (".engine", ".plan") or (path.is_dir() and any(path.glob("*.engine"))):
            return "tensorrt"
    return "torch"


def base_versions() -> dict[str, str]:
    import transformers

    import compressor

    return {
        "python": platform.python_version(),
        "compressor": getattr(compressor, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": str(os.cpu_count()),
    }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_device(device: str | None) -> None:
    """Refuse a device this machine cannot run on (None and "cpu" always can)."""
    if device is None or str(device) == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if not match:
        raise CompressorError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CompressorError(f"--device {device} needs a CUDA GPU, and torch sees none: use --device cpu")
    if match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise CompressorError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), "
                              f"numbered from 0: use cuda:0 up to cuda:{torch.cuda.device_count() - 1}")


# --- PyTorch --------------------------------------------------------------------------------

# torch's intra-op thread count is process-wide: the backends that set one share the count found before
# the first of them, which the last of them to close puts back.
_THREAD_HOLDERS: set[int] = set()
_THREADS_BEFORE = [0]


def _hold_threads(owner, threads: int) -> None:
    if not _THREAD_HOLDERS:
        _THREADS_BEFORE[0] = torch.get_num_threads()
    _THREAD_HOLDERS.add(id(owner))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _release_threads(owner) -> None:
    if id(owner) in _THREAD_HOLDERS:
        _THREAD_HOLDERS.discard(id(owner))
        if not _THREAD_HOLDERS:
            torch.set_num_threads(_THREADS_BEFORE[0])


@register_backend("torch", "PyTorch eager, CPU or CUDA; --compile for torch.compile")
class TorchBackend:
    """A torch model behind the Backend calls. `threads` sets torch's intra-op thread count, which is
    process-wide: it holds from construction until `close()` (or the end of a `with` block), which puts
    back the count found before. A call after `close()` sets it again, so a backend kept between
    measurements is closed after each one (`benchmark` does) and what runs in between (healing,
    exporting) keeps every core."""

    name = "torch"

    def __init__(self, model, device: str = "cpu", threads: int | None = None, dtype: str = "float32",
                 compile: bool = False, allow_pickle: bool = False, source: str | Path | None = None):
        check_device(device)
        self.threads = threads
        self.tokenizer = None
        if isinstance(model, torch.nn.Module):
            self.model = model.to(device) if device else model
        else:
            from compressor.loading import load_model, resolve

            source = resolve(model)
            self.model, self.tokenizer = load_model(source, dtype=dtype, device=device, allow_pickle=allow_pickle)
        self.model.eval()
        self.source = source
        self.device = str(next(self.model.parameters()).device)
        self.cuda_events = self.device.startswith("cuda")
        self.compiled = compile
        self._call = torch.compile(self.model) if compile else self.model
        self._cache_kwarg = cache_kwarg(self.model)
        from compressor.adapters import get_adapter

        self.num_blocks = get_adapter(self.model).num_blocks(self.model)
        self.vocab_size = self.model.config.get_text_config().vocab_size
        if self.cuda_events:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._pin()

    def versions(self) -> dict[str, str]:
        versions = base_versions()
        if self.cuda_events:
            versions["cuda"] = str(torch.version.cuda)
            versions["gpu"] = torch.cuda.get_device_name(self.device)
        return versions

    def settings(self) -> dict[str, Any]:
        return {
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "threads": self.threads or torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "compile": self.compiled,
            "cache": f"DynamicCache via {self._cache_kwarg}=",
            "timer": "cuda events" if self.cuda_events else "perf_counter",
        }

    def size_bytes(self) -> int | None:
        if isinstance(self.source, Path) and self.source.exists():
            return dir_size(self.source)
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor):
        self._pin()
        cache = new_cache(self.model.config)
        out = self._call(input_ids=input_ids.to(self.device), use_cache=True, **{self._cache_kwarg: cache})
        return cache, out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def decode_step(self, state):
        self._pin()
        cache, next_ids = state
        out = self._call(input_ids=next_ids, use_cache=True, **{self._cache_kwarg: cache})
        return cache, out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._pin()
        return self._call(input_ids=input_ids.to(self.device), use_cache=False).logits

    def sync(self) -> None:
        if self.cuda_events:
            torch.cuda.synchronize(self.device)

    def _pin(self) -> None:
        if self.threads:
            _hold_threads(self, self.threads)

    def close(self) -> None:
        """Put back the torch thread count this backend changed (a later call sets it again)."""
        _release_threads(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- runners from compressor.export (ONNX Runtime, TensorRT) ---------------------------------

class RunnerBackend:
    """Drives an export runner: `.forward(ids, mask, positions, past) -> (logits, present)`."""

    name = "runner"
    cuda_events = False

    def __init__(self, runner, path: Path, device: str, threads: int | None):
        self.runner, self.path, self.device, self.threads = runner, path, device, threads
        self.num_blocks = int(runner.num_layers)
        config = getattr(runner, "config", None)
        if config is not None:
            self.vocab_size = int(config.get_text_config().vocab_size)
        else:  # config.json, or genai_config.json in a folder the builder wrote alone
            raw, genai = _read_config(path), _read_config(path, "genai_config.json").get("model", {})
            self.vocab_size = int(raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")
                                  or genai.get("vocab_size") or 0)
        self.tokenizer = _maybe_tokenizer(path)

    def versions(self) -> dict[str, str]:
        return base_versions()

    def settings(self) -> dict[str, Any]:
        return {"threads": self.threads if self.threads else "runtime default", "timer": "perf_counter"}

    def close(self) -> None:
        """Nothing process-wide to undo: a runner's threads belong to its own session."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def size_bytes(self) -> int | None:
        return dir_size(self.path)

    def prefill(self, input_ids: torch.Tensor):
        ids = input_ids.cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        mask = np.ones((batch, length), dtype=np.int64)
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        logits, present = self.runner.forward(ids, mask, positions, self.runner.empty_past(batch))
        return present, np.asarray(logits)[:, -1:].argmax(-1).astype(np.int64), length

    def decode_step(self, state):
        past, next_ids, length = state
        batch = next_ids.shape[0]
        mask = np.ones((batch, length + 1), dtype=np.int64)
        positions = np.full((batch, 1), length, dtype=np.int64)
        logits, present = self.runner.forward(next_ids, mask, positions, past)
        return present, np.asarray(logits)[:, -1:].argmax(-1).astype(np.int64), length + 1

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        from compressor.evaluate.perplexity import runner_logits

        return torch.from_numpy(np.asarray(runner_logits(self.runner, input_ids.cpu().numpy())))

    def sync(self) -> None:  # runners return host arrays: the work is done when forward returns
        pass


@register_backend("onnxruntime", "ONNX Runtime on an export directory (model.onnx + config.json)")
class OrtBackend(RunnerBackend):
    name = "onnxruntime"

    def __init__(self, model, device: str = "cpu", threads: int | None = None, providers=None, **_):
        ort = require("onnxruntime", "onnx", "benchmarking ONNX models")
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"{path} does not exist: pass an export directory from `compress export`")
        runtime = _export_module("runtime", "ONNX Runtime")
        if providers is None:
            providers = runtime.providers_for(device)
        super().__init__(runtime.OrtCausalLM(path, threads=threads, providers=providers), _model_dir(path),
                         device, threads)
        self._ort_version = ort.__version__

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "onnxruntime": self._ort_version}

    def settings(self) -> dict[str, Any]:
        session = getattr(self.runner, "session", None)
        providers = session.get_providers() if session is not None else None
        return {**super().settings(), "providers": providers, "intra_op_threads": self.threads or "default",
                "intra_op_spinning": False}


@register_backend("tensorrt", "TensorRT engine (where TensorRT is installed)")
class TrtBackend(RunnerBackend):
    name = "tensorrt"

    def __init__(self, model, device: str = "cuda", threads: int | None = None, **_):
        trt = require("tensorrt", "tensorrt", "benchmarking TensorRT engines")
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"{path} does not exist: pass a TensorRT engine from `compress export`")
        module = _export_module("tensorrt", "TensorRT")
        super().__init__(module.TrtCausalLM(path), _model_dir(path), "cuda", threads)
        self._trt_version = trt.__version__

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "tensorrt": self._trt_version, "cuda": str(torch.version.cuda)}


def _export_module(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(f"compressor.export.{name}")
    except ImportError as exc:
        if "compressor.export" not in str(exc):
            raise
        raise CompressorError(f"this compressor has no {what} runner (compressor.export.{name}): "
                              "upgrade compressor") from exc


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read_config(path: Path, name: str = "config.json") -> dict:
    config = _model_dir(path) / name
    return json.loads(config.read_text()) if config.is_file() else {}


def _maybe_tokenizer(path: Path):
    from compressor.loading import load_tokenizer

    try:
        return load_tokenizer(_model_dir(path))
    except CompressorError:
        log.debug("no tokenizer next to %s", path)
        return None


def backend_names() -> list[str]:
    return sorted(BACKENDS)
