"""One export, start to finish: ONNX graph, ONNX Runtime optimisation, validation, TensorRT engine.

The steps stay separate functions (`export_onnx`, `validate_onnx`, `build_engine`); this module
only runs them in order and writes export.json, the summary of what the folder holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import CompressorError, require
from compressor.export.onnx import DEFAULT_OPSET, export_onnx, parse_export_dtype
from compressor.io import write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
SUMMARY_FILE = "export.json"


@dataclass
class ExportSummary:
    format: str
    dtype: str
    opset: int
    num_layers: int
    record: dict
    files: dict[str, int]
    onnx_size_bytes: int
    optimized_size_bytes: int | None
    seconds: float
    validation: dict | None = None
    engine: dict | None = None
    engine_validation: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_export_options(format: str = "onnx", dtype: str = "float32", opset: int = DEFAULT_OPSET) -> None:
    """Fail fast, before any model is loaded: unknown format or dtype, missing extras, no GPU for TensorRT."""
    if format not in FORMATS:
        raise CompressorError(f"unknown export format '{format}': choose {' or '.join(FORMATS)}")
    parse_export_dtype(dtype)
    from compressor.export.onnx import MIN_OPSET

    if opset < MIN_OPSET:
        raise CompressorError(f"opset {opset} is too old for the dynamo exporter: use {MIN_OPSET} or newer")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "onnx", "exporting to ONNX")
    if format == "tensorrt":
        from compressor.export.tensorrt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda("building a TensorRT engine")


def export_model(
    model,
    tokenizer,
    out_dir: Path | str,
    format: str = "onnx",
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
    validate: bool = True,
    allow_mismatch: bool = False,
    profile=None,
    workspace_gb: float | None = None,
    threads: int | None = None,
) -> ExportSummary:
    """Export into `out_dir` (an existing, empty folder: the CLI passes atomic_dir's) and validate.

    A failed validation raises ExportMismatchError unless allow_mismatch.
    """
    from compressor.surgery import compressor_record

    check_export_options(format, dtype, opset)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    exported = export_onnx(model, tokenizer, out_dir, dtype=dtype, opset=opset, optimize=optimize)
    summary = ExportSummary(
        format=format, dtype=exported.dtype, opset=opset, num_layers=exported.num_layers,
        record=compressor_record(model), files={}, onnx_size_bytes=exported.size_bytes,
        optimized_size_bytes=exported.optimized_size_bytes, seconds=0.0,
    )
    if validate:
        from compressor.export.validate import validate_onnx

        report = validate_onnx(model, out_dir, tokenizer=tokenizer, allow_mismatch=allow_mismatch, threads=threads)
        summary.validation = report.to_dict()
        if not report.all_passed:
            summary.warnings.append("ONNX validation failed (kept because of --allow-mismatch)")
    if format == "tensorrt":
        _tensorrt(model, tokenizer, out_dir, exported.path, summary, profile, workspace_gb, validate, allow_mismatch)
    summary.files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    summary.seconds = round(time.perf_counter() - start, 2)
    write_json(out_dir / SUMMARY_FILE, summary.to_dict())
    return summary


def _tensorrt(model, tokenizer, out_dir, onnx_path, summary, profile, workspace_gb, validate, allow_mismatch):
    from dataclasses import asdict

    from compressor.export.tensorrt import TrtCausalLM, build_engine

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
