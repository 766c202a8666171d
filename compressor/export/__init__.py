"""Shipping a model: ONNX with its KV cache (onnxruntime-genai's builder or torch.onnx), quantized
weights, validation against PyTorch, and TensorRT engines.

`export_model` runs the whole export (what `compress export` does); the steps are `run_builder` /
`export_onnx`, `compressor.quantize.quantize_onnx`, `validate_onnx` / `validate_quantized` and
`compressor.export.tensorrt.build_engine`. `OrtCausalLM`, `genai_generate` and
`compressor.export.tensorrt.TrtCausalLM` run the results. onnx, onnxruntime, onnxruntime-genai and
tensorrt are imported only when a step needs them.
"""

from compressor.export.genai import builder_refusal, genai_generate, run_builder, write_genai_config
from compressor.export.onnx import OnnxExport, export_onnx
from compressor.export.quality import QualityBounds, QualityReport, validate_quantized
from compressor.export.run import ExportSummary, choose_route, export_model
from compressor.export.runtime import OrtCausalLM
from compressor.export.validate import ExportMismatchError, ValidationReport, validate_onnx

__all__ = [
    "ExportMismatchError",
    "ExportSummary",
    "OnnxExport",
    "OrtCausalLM",
    "QualityBounds",
    "QualityReport",
    "ValidationReport",
    "builder_refusal",
    "choose_route",
    "export_model",
    "export_onnx",
    "genai_generate",
    "run_builder",
    "validate_onnx",
    "validate_quantized",
    "write_genai_config",
]
