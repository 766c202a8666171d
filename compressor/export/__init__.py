"""Shipping a model: ONNX with its KV cache, validated against PyTorch, and TensorRT engines.

`export_model` runs the whole export (what `compress export` does); the steps are `export_onnx`,
`validate_onnx` and `compressor.export.tensorrt.build_engine`. `OrtCausalLM` and
`compressor.export.tensorrt.TrtCausalLM` run the results. onnx, onnxruntime and tensorrt are
imported only when a step needs them.
"""

from compressor.export.onnx import OnnxExport, export_onnx
from compressor.export.pipeline import ExportSummary, export_model
from compressor.export.runtime import OrtCausalLM
from compressor.export.validate import ExportMismatchError, ValidationReport, validate_onnx

__all__ = [
    "ExportMismatchError",
    "ExportSummary",
    "OnnxExport",
    "OrtCausalLM",
    "ValidationReport",
    "export_model",
    "export_onnx",
    "validate_onnx",
]
