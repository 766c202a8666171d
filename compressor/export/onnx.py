"""Exporting a causal LM to ONNX with its KV cache, named the way Hugging Face Optimum names it.

Inputs: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`.
Outputs: `logits`, `present.{i}.key|value`. Batch, sequence and past length are dynamic, and the
past may be empty (length 0) for the first step. A model with removed blocks simply has fewer
layers: its cache inputs are numbered 0..L'-1.

The graph comes from `torch.onnx.export(dynamo=True)` (the TorchScript exporter fails on current
transformers). A small wrapper takes the cache as flat tensors, builds a `DynamicCache`, runs the
model and returns the updated cache flat again.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.blocks import num_blocks
from compressor.errors import CompressorError, first_line, require
from compressor.util.kvcache import cache_kwarg, cache_of
from compressor.util.progress import status

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
DEFAULT_OPSET = 18
MIN_OPSET = 18
EXPORT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
# Upper bounds for the dynamic axes; the graph itself has no limit below these.
_MAX_BATCH, _MAX_SEQ = 4096, 131072


class ExportError(CompressorError):
    """The model could not be turned into an ONNX graph."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote."""

    path: Path
    num_layers: int
    dtype: str
    opset: int
    size_bytes: int
    seconds: float
    optimized: Path | None = None
    optimized_size_bytes: int | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))]


def parse_export_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16):
            raise ExportError(f"cannot export {dtype} weights: choose float32 or float16")
        return dtype
    try:
        return EXPORT_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ExportError(f"unsupported export dtype '{dtype}': choose float32 or float16") from None


def flat_cache(cache) -> list[torch.Tensor]:
    """[key0, value0, key1, value1, ...] from a transformers Cache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def make_cache(past: list[torch.Tensor]):
    """A DynamicCache holding flat (key, value) pairs: one full-length layer each.

    Built without the config on purpose: sliding-window layers would crop the cache with a
    Python counter that a trace bakes in. A full layer plus the model's sliding mask gives the
    same logits, and the cache keeps the Optimum layout (past + new tokens).
    """
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])


class CausalLMWithFlatCache(torch.nn.Module):
    """Runs a causal LM with its cache as flat tensors in and out (the exported graph's signature)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._cache_kw = cache_kwarg(model)
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: list[torch.Tensor]):
        kwargs = {self._cache_kw: make_cache(past_key_values)}
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        return (out.logits, *flat_cache(cache_of(out)))


@torch.no_grad()
def example_inputs(model, batch: int = 2, seq: int = 3, past: int = 5, seed: int = 0) -> tuple:
    """Inputs for tracing, with a real past (the model's own cache for a random prefix).

    Sizes differ from each other and from 0 and 1 so that the tracer keeps every axis symbolic.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    prefix = torch.randint(3, vocab, (batch, past), generator=gen).to(device)
    wrapper = CausalLMWithFlatCache(model)
    empty = empty_cache_like(model, batch, device)
    cache = wrapper(prefix, torch.ones_like(prefix), _positions(batch, 0, past, device), empty)[1:]
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    return ids, mask, _positions(batch, past, seq, device), list(cache)


def _positions(batch: int, start: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).expand(batch, length).contiguous()


@torch.no_grad()
def empty_cache_like(model, batch: int, device=None) -> list[torch.Tensor]:
    """Zero-length (key, value) tensors per layer, shaped like the model's own cache."""
    device = device or next(model.parameters()).device
    out = model(input_ids=torch.ones(1, 1, dtype=torch.long, device=device), use_cache=True)
    return [t.new_zeros((batch, *t.shape[1:-2], 0, t.shape[-1])) for t in flat_cache(cache_of(out))]


def _dynamic_shapes(num_layers: int) -> dict:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=_MAX_BATCH)
    seq = Dim("sequence", min=1, max=_MAX_SEQ)
    past = Dim("past_sequence", min=0, max=_MAX_SEQ)
    total = Dim("total_sequence", min=1, max=2 * _MAX_SEQ)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [{0: batch, 2: past} for _ in range(2 * num_layers)],
    }


@contextlib.contextmanager
def _tracing_mode(model):
    """Eval mode, cache on, and transformers' eager attention while tracing.

    Eager attention adds one float mask before the softmax. SDPA would trace to its math
    decomposition instead: a boolean Where, a NaN-safe softmax and another Where in every layer,
    about a fifth of ONNX Runtime's prefill time on SmolLM2 (and its fused CPU kernels branch on
    batch == 1, which would freeze the batch axis).
    """
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    attention = getattr(model.config, "_attn_implementation", None)
    model.eval()
    model.config.use_cache = True
    if attention != "eager":
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
        if attention not in (None, "eager"):
            model.set_attn_implementation(attention)


def export_onnx(
    model,
    tokenizer,
    out_dir: Path | str,
    dtype: str | torch.dtype | None = "float32",
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
) -> OnnxExport:
    """Export `model` (with `tokenizer`, may be None) into `out_dir` as model.onnx plus its config.

    dtype: weights of the graph (float32 or float16; None keeps the model's). A model in another
    dtype is exported from a converted copy; `model` itself is never changed.
    optimize: also save ONNX Runtime's graph-optimised model (see `optimize_onnx`).
    """
    require("onnxscript", "onnx", "exporting to ONNX")
    require("onnx", "onnx", "exporting to ONNX")
    target = parse_export_dtype(dtype)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the dynamo exporter: use {MIN_OPSET} or newer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_dtype = next(model.parameters()).dtype
    if target is not None and target != source_dtype:
        log.info("exporting a %s copy of the %s model", target, source_dtype)
        model = copy.deepcopy(model).to(target)
        model.config.dtype = target  # the copy's config.json then says what the graph holds
    export_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if export_dtype not in ("float32", "float16"):
        raise ExportError(f"the model is {export_dtype}: pass dtype='float32' or 'float16' to export it")
    layers = num_blocks(model)

    start = time.perf_counter()
    status(f"tracing {type(model).__name__} ({layers} blocks, {export_dtype}) for ONNX")
    program = _trace(model, layers, opset)
    path = out_dir / ONNX_FILE
    status(f"writing {path.name}")
    program.save(str(path))
    del program
    write_metadata(model, tokenizer, out_dir)
    result = OnnxExport(path=path, num_layers=layers, dtype=export_dtype, opset=opset,
                        size_bytes=onnx_size(path), seconds=0.0)
    if optimize:
        result.optimized = optimize_onnx(path, out_dir / OPTIMIZED_FILE)
        result.optimized_size_bytes = onnx_size(result.optimized)
    result.seconds = round(time.perf_counter() - start, 2)
    result.files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    log.debug("exported %s (%d layers, %.1f MB) in %.1f s", path, layers, result.size_bytes / 1e6, result.seconds)
    return result


def _trace(model, layers: int, opset: int):
    wrapper = CausalLMWithFlatCache(model).eval()
    with _tracing_mode(model):
        args = example_inputs(model)
        try:
            with _quiet_exporter():
                return torch.onnx.export(
                    wrapper, args, dynamo=True, dynamic_shapes=_dynamic_shapes(layers),
                    input_names=input_names(layers), output_names=output_names(layers),
                    opset_version=opset, optimize=True, verbose=False,
                )
        except Exception as exc:  # the exporter's own errors are long; keep the first line
            raise ExportError(
                f"torch.onnx could not export {type(model).__name__}: {first_line(exc)} "
                "(COMPRESSOR_DEBUG=1 shows the full traceback)"
            ) from exc


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress to stdout and warns about naming; keep stdout for --json."""
    import io
    import warnings

    sink = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.filterwarnings("ignore", message=".*axis name.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch_onnx_log.setLevel(logging.ERROR)
            yield
    finally:
        torch_onnx_log.setLevel(level)
        log.debug("torch.onnx: %s", sink.getvalue())


def write_metadata(model, tokenizer, out_dir: Path) -> None:
    """config.json, generation_config.json and tokenizer files: the folder describes itself."""
    model.config.save_pretrained(out_dir)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        try:
            generation.save_pretrained(out_dir)
        except (ValueError, OSError) as exc:  # an invalid generation config must not block the export
            log.warning("generation_config.json not written: %s", exc)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def onnx_size(path: Path | str) -> int:
    """Bytes of an ONNX file plus its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def optimize_onnx(src: Path | str, dst: Path | str) -> Path:
    """Save ONNX Runtime's graph-optimised model (ORT_ENABLE_EXTENDED) to `dst`.

    EXTENDED fuses LayerNorm, GELU, attention pieces and MatMul+Add into ONNX Runtime's contrib
    ops: the file then needs ONNX Runtime (CPU or CUDA provider), not another runtime. ALL would
    add layout changes specific to the CPU that saved it, so it is applied at load time instead.
    The plain model.onnx stays beside it for TensorRT and other runtimes. A tied LM head is saved
    twice in the optimised file (the MatMul gets its own transposed copy), so it is larger.
    """
    ort = require("onnxruntime", "onnx", "optimising ONNX models")
    src, dst = Path(src), Path(dst)
    status(f"optimising {src.name} with ONNX Runtime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    from compressor.quantize.protos import PROTOBUF_LIMIT

    # The optimised graph may hold a tied head twice: external data once it could pass protobuf's limit.
    if src.with_name(src.name + ".data").exists() or 2 * onnx_size(src) >= PROTOBUF_LIMIT:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", dst.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst
