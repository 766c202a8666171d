"""One export, start to finish: graph (builder or torch.onnx), quantization, validation, TensorRT.

The steps stay separate functions (`run_builder`, `export_onnx`, `quantize_onnx`, `validate_onnx`,
`validate_quantized`, `build_engine`); this module chooses the route, runs them in order and
writes export.json, the summary of what the folder holds (route and why, precision, numbers).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from compressor.blocks import num_blocks
from compressor.errors import CompressorError, require
from compressor.export.onnx import DEFAULT_OPSET, ONNX_FILE, export_onnx
from compressor.util.io import write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
ROUTES = ("auto", "builder", "dynamo")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32", "int4": "float32"}
SUMMARY_FILE = "export.json"
_STAGE = ".float-graph"  # where an int8/int4 export keeps its float graph until it is quantized
CALIBRATION_WINDOWS, CALIBRATION_LENGTH = 64, 256  # int4 calibration: 16k tokens


@dataclass
class ExportSummary:
    format: str
    precision: str
    dtype: str
    route: str
    route_reason: str
    opset: int
    num_layers: int
    record: dict
    files: dict[str, int]
    onnx_size_bytes: int
    optimized_size_bytes: int | None
    seconds: float
    graph_seconds: float = 0.0
    quantization: dict | None = None
    validation: dict | None = None
    engine: dict | None = None
    engine_validation: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_precision(precision: str) -> str:
    value = _ALIASES.get(str(precision).lower(), str(precision).lower())
    if value not in PRECISIONS:
        raise CompressorError(f"unknown precision '{precision}': choose {', '.join(PRECISIONS)}")
    return value


def _cuda_onnxruntime() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def check_export_options(format: str = "onnx", precision: str = "fp32", opset: int = DEFAULT_OPSET,
                         route: str = "auto") -> str:
    """Fail fast, before any model is loaded; returns the canonical precision.

    Refuses: unknown format/route/precision, missing extras, int4 on TensorRT, int8/fp8 on TensorRT
    without ModelOpt, fp8 outside TensorRT, bf16 without a CUDA ONNX Runtime, the builder route for
    TensorRT (its fused ops are ONNX Runtime's own).
    """
    from compressor.export.onnx import MIN_OPSET

    if format not in FORMATS:
        raise CompressorError(f"unknown export format '{format}': choose {' or '.join(FORMATS)}")
    if route not in ROUTES:
        raise CompressorError(f"unknown export route '{route}': choose {', '.join(ROUTES)}")
    precision = parse_precision(precision)
    if opset < MIN_OPSET:
        raise CompressorError(f"opset {opset} is too old for the dynamo exporter: use {MIN_OPSET} or newer")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx", "exporting to ONNX")
    if format == "tensorrt":
        _check_tensorrt(precision, route)
    elif precision == "fp8":
        raise CompressorError("fp8 is a TensorRT precision: pass --format tensorrt (with NVIDIA ModelOpt installed)")
    elif precision == "bf16" and not _cuda_onnxruntime():
        raise CompressorError("bf16 graphs need ONNX Runtime's CUDA provider (this ONNX Runtime has none, and its "
                              "CPU kernels do not compute bf16): export fp32, int8 or int4 for the CPU")
    if route == "builder" and precision == "fp16" and not _cuda_onnxruntime():
        raise CompressorError("the builder's fp16 graphs are for CUDA and this ONNX Runtime has none: "
                              "use --route dynamo (or auto) for an fp16 graph")
    return precision


def _check_tensorrt(precision: str, route: str) -> None:
    import importlib.util

    from compressor.export.tensorrt import require_cuda, require_tensorrt

    if precision == "bf16":
        raise CompressorError("bf16 TensorRT engines are not built here (torch.onnx graphs are fp32 or fp16): "
                              "choose fp16 for TensorRT, or bf16 with --format onnx on a CUDA ONNX Runtime")
    if precision == "int4":
        raise CompressorError("TensorRT engines cannot hold int4 weight-only MatMulNBits: export int4 with "
                              "--format onnx, or choose fp32, fp16, bf16, int8 or fp8 for TensorRT")
    if precision in ("int8", "fp8") and importlib.util.find_spec("modelopt") is None:
        raise CompressorError(f"{precision} TensorRT engines need NVIDIA ModelOpt's ONNX quantization, which is "
                              "not installed (pip install nvidia-modelopt); or choose fp16 or bf16")
    if route == "builder":
        raise CompressorError("the builder's graphs use ONNX Runtime's own fused ops, which TensorRT cannot "
                              "build: use --route dynamo (or auto) with --format tensorrt")
    require_tensorrt()
    require_cuda("building a TensorRT engine")


def choose_route(model, route: str, precision: str, format: str = "onnx",
                 has_tokenizer: bool = True) -> tuple[str, str]:
    """("builder" | "dynamo", why) for this model, precision and format."""
    from compressor.export.genai import builder_refusal

    if format == "tensorrt":
        return "dynamo", "TensorRT builds engines from torch.onnx graphs (the builder's fused ops are ORT-only)"
    refusal = builder_refusal(model, has_tokenizer)
    if precision == "bf16" and (route == "dynamo" or refusal):
        raise CompressorError(f"bf16 graphs come from onnxruntime-genai's builder only, which cannot export this "
                              f"model ({refusal or 'route dynamo requested'}): export fp16 instead")
    if route == "dynamo":
        return "dynamo", "requested (--route dynamo)"
    if precision == "fp16" and not _cuda_onnxruntime():
        return "dynamo", "the builder's fp16 graphs are for CUDA and this ONNX Runtime has none"
    if refusal and route == "builder":
        raise CompressorError(f"--route builder cannot export this model: {refusal}; use --route auto or dynamo")
    if refusal:
        return "dynamo", f"fallback: {refusal}"
    return "builder", "onnxruntime-genai's builder exports this family (fused attention, rotary and norms)"


def export_model(
    model,
    tokenizer,
    out_dir: Path | str,
    format: str = "onnx",
    precision: str = "fp32",
    route: str = "auto",
    quant=None,
    bounds=None,
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
    validate: bool = True,
    allow_mismatch: bool = False,
    profile=None,
    workspace_gb: float | None = None,
    threads: int | None = None,
    data: Path | str | None = None,
    float_graph: Path | str | None = None,
    eval: Path | str | None = None,
    quantized_copy: Path | str | None = None,
) -> ExportSummary:
    """Export into `out_dir` (an existing, empty folder: the CLI passes atomic_dir's) and validate.

    precision: fp32 | fp16 | bf16 | int8 | int4 (| fp8 for TensorRT). int8/int4 quantize the fp32
    graph's weights with `compressor.quantize.quantize_onnx` (`quant`: a QuantConfig; its `bits` is
    set from the precision) and are validated against `bounds` (a QualityBounds) instead of exactly.
    route: auto | builder | dynamo (see `choose_route`). A failed validation raises unless allow_mismatch.
    data: the text that int8/int4 calibrate on (None: the bundled text); its end is held out and
    the quantized graph is validated there (`compressor.export.quality.split_text`).
    eval: a text (file or folder, as `data`) the quantized graph is validated on instead of that end.
    float_graph: a folder from an earlier fp32 export of this same model (any route choice leads to
    the same graph): int8/int4 quantize a copy of its graph instead of exporting the model again.
    quantized_copy: a folder from an earlier int8/int4 export of this same model at this precision with
    this `quant` and `data` (unvalidated: a pipeline's probe): its files are copied and only validated.
    """
    from compressor.surgery.edit import compressor_record

    precision = check_export_options(format, precision, opset, route)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    chosen, reason = choose_route(model, route, precision, format, has_tokenizer=tokenizer is not None)
    log.info("export route: %s (%s)", chosen, reason)
    quantized = precision in ("int8", "int4")
    copied = quantized and quantized_copy is not None
    graph_dir = out_dir / _STAGE if quantized and not copied else out_dir
    graph_dir.mkdir(parents=True, exist_ok=True)
    graph_precision = "fp32" if quantized or precision == "fp8" else precision
    if copied:
        log.info("validating a copy of the %s export in %s", precision, quantized_copy)
        graph_seconds, optimized = _copy_graph(Path(quantized_copy), out_dir), None
    elif quantized and float_graph is not None:
        log.info("quantizing a copy of the fp32 graph in %s", float_graph)
        graph_seconds, optimized = _copy_graph(Path(float_graph), graph_dir), None
    else:
        graph_seconds, optimized = _float_graph(model, tokenizer, graph_dir, chosen, graph_precision, opset,
                                                optimize and not quantized)
    summary = ExportSummary(
        format=format, precision=precision, dtype=_TORCH_DTYPE.get(precision, "float32"), route=chosen,
        route_reason=reason, opset=opset, num_layers=num_blocks(model), record=compressor_record(model),
        files={}, onnx_size_bytes=0, optimized_size_bytes=optimized, seconds=0.0, graph_seconds=graph_seconds,
    )
    if optimize and (quantized or chosen == "builder"):
        summary.warnings.append("--optimize applies to fp32/fp16 torch.onnx graphs only; not written")
    held_out = None
    if quantized:
        from compressor.export.quality import validation_text

        texts, held_out = validation_text(data, eval)
        if copied:
            summary.quantization = read_summary(Path(quantized_copy)).get("quantization")
        else:
            summary.quantization = _quantize(model, tokenizer, graph_dir, out_dir, precision, quant, texts)
    if validate:
        _validate(model, tokenizer, out_dir, precision, bounds, allow_mismatch, threads, summary, held_out)
    if format == "tensorrt":
        _tensorrt(model, tokenizer, out_dir, out_dir / ONNX_FILE, summary, profile, workspace_gb, validate,
                  allow_mismatch, precision)
    from compressor.export.onnx import onnx_size

    summary.onnx_size_bytes = onnx_size(out_dir / ONNX_FILE)
    summary.files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    summary.seconds = round(time.perf_counter() - start, 2)
    write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    return summary


def read_summary(folder: Path) -> dict:
    """The ExportSummary an export folder recorded (export.json), as a dictionary."""
    import json

    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def _float_graph(model, tokenizer, out_dir: Path, route: str, precision: str, opset: int,
                 optimize: bool) -> tuple[float, int | None]:
    """The fp32/fp16/bf16 graph, genai_config.json and the model's metadata in `out_dir`."""
    from compressor.export.genai import run_builder, write_genai_config
    from compressor.export.onnx import empty_cache_like, write_metadata

    if route == "builder":
        seconds = run_builder(model, tokenizer, out_dir, precision)
        write_metadata(model, tokenizer, out_dir)  # config.json: runners and `compress bench` read it
        return seconds, None
    exported = export_onnx(model, tokenizer, out_dir, dtype=_TORCH_DTYPE[precision], opset=opset, optimize=optimize)
    cache = empty_cache_like(model, 1)[0]
    write_genai_config(model, out_dir, (int(cache.shape[1]), int(cache.shape[-1])))
    return exported.seconds, exported.optimized_size_bytes


def _copy_graph(source: Path, graph_dir: Path) -> float:
    """The fp32 graph and the files beside it, copied from an earlier export folder into graph_dir (onnx
    refuses hard-linked external data); not that export's own records (export.json, validation) nor
    hidden files (other tools' markers)."""
    start = time.perf_counter()
    if not (source / ONNX_FILE).is_file():
        raise CompressorError(f"{source} holds no {ONNX_FILE} to quantize")
    for item in source.iterdir():
        if item.is_file() and item.name != SUMMARY_FILE and not item.name.startswith((".", "validation")):
            shutil.copy2(item, graph_dir / item.name)
    return round(time.perf_counter() - start, 2)


def _quantize(model, tokenizer, graph_dir: Path, out_dir: Path, precision: str, quant, texts: list[str]) -> dict:
    """quantize_onnx on the float graph (calibrated on `texts`), into out_dir; the float graph's
    other files move beside it."""
    import dataclasses

    from compressor.quantize import QuantConfig, quantize_onnx
    from compressor.quantize.fake import follow_training

    bits = 8 if precision == "int8" else 4
    config = dataclasses.replace(quant or QuantConfig(), bits=bits)
    # A model healed quantization-aware (compress heal --quantization-aware) gets the integers it trained.
    config, notes = follow_training(model, graph_dir / ONNX_FILE, config)
    calibration = _calibration(tokenizer, config, texts)
    summary = quantize_onnx(graph_dir / ONNX_FILE, out_dir / ONNX_FILE, config, calibration=calibration)
    summary.notes += notes
    for item in graph_dir.iterdir():
        if item.name not in (ONNX_FILE, ONNX_FILE + ".data"):
            shutil.move(str(item), out_dir / item.name)
    shutil.rmtree(graph_dir)
    return summary.to_dict()


def _calibration(tokenizer, config, texts: list[str]):
    """Calibration windows from `texts` for the algorithms that use them, else None."""
    wants = config.algorithm not in ("rtn", "auto") or (config.algorithm == "auto" and config.bits == 4)
    if not wants or tokenizer is None:
        return None
    from compressor.data import make_windows

    return make_windows(tokenizer, texts, CALIBRATION_WINDOWS, CALIBRATION_LENGTH, seed=0, at_most=True)


def _validate(model, tokenizer, out_dir, precision, bounds, allow_mismatch, threads, summary, held_out=None) -> None:
    if precision in ("int8", "int4"):
        from compressor.export.quality import validate_quantized

        report = validate_quantized(model, out_dir, tokenizer, precision, bounds, allow_mismatch, threads, held_out)
        summary.validation = report.to_dict()
        passed = report.passed
    else:
        from compressor.export.validate import validate_onnx

        report = validate_onnx(model, out_dir, tokenizer=tokenizer, allow_mismatch=allow_mismatch, threads=threads)
        summary.validation = report.to_dict()
        passed = report.all_passed
    if not passed:
        summary.warnings.append("ONNX validation failed (kept because of --allow-mismatch)")


def _tensorrt(model, tokenizer, out_dir, onnx_path, summary, profile, workspace_gb, validate, allow_mismatch,
              precision):
    from dataclasses import asdict

    from compressor.export.tensorrt import TrtCausalLM, build_engine

    if precision in ("int8", "fp8"):
        from compressor.export.tensorrt import modelopt_qdq

        onnx_path = modelopt_qdq(onnx_path, precision)
    info = build_engine(onnx_path, out_dir / "model.engine", profile=profile, workspace_gb=workspace_gb)
    summary.engine = asdict(info)
    if not validate:
        return
    from compressor.export.validate import check, validate_runner

    runner = TrtCausalLM(out_dir / info.path)
    report = validate_runner(model, runner, info.dtype, tokenizer, file=str(out_dir / info.path),
                             runtime=f"tensorrt {info.tensorrt} on {info.gpu}")
    write_json(out_dir / "validation_tensorrt.json", report.to_dict())
    summary.engine_validation = report.to_dict()
    check(report, allow_mismatch)
    if not report.passed:
        summary.warnings.append("TensorRT validation failed (kept because of --allow-mismatch)")


def quant_options(precision: str, block_size: int = 32, grid: str = "auto", accuracy_level: int = 4,
                  algorithm: str = "auto", keep_int8: str = "auto", max_ppl_increase_pct: float | None = None,
                  min_top1: float | None = None, max_kl: float | None = None, embeddings: str = "auto",
                  int8_fraction: float | None = None):
    """(QuantConfig, QualityBounds) for an int8/int4 export, checked; (None, None) for the others. None:
    QuantConfig's (measured) default."""
    import dataclasses

    if precision not in ("int8", "int4"):
        return None, None
    from compressor.export.quality import DEFAULT_BOUNDS
    from compressor.quantize import QuantConfig

    config = QuantConfig(bits=8 if precision == "int8" else 4, block_size=block_size, grid=grid,
                         accuracy_level=accuracy_level, algorithm=algorithm, keep_int8=keep_int8, embeddings=embeddings,
                         **({} if int8_fraction is None else {"int8_fraction": int8_fraction}))
    changes = {k: v for k, v in (("max_ppl_increase", None if max_ppl_increase_pct is None
                                  else max_ppl_increase_pct / 100), ("min_top1", min_top1), ("max_kl", max_kl))
               if v is not None}
    bounds = dataclasses.replace(DEFAULT_BOUNDS[precision], **changes)
    problems = config.problems() + bounds.problems()
    if problems:
        raise CompressorError("bad quantization options: " + "; ".join(problems))
    return config, bounds
