"""Weight-only int4/int8 quantization of ONNX graphs for ONNX Runtime CPU (MatMulNBits).

(The measured decision is filled in below once bench/quantize.py has run.)
"""

from compressor.quantize.calibration import Hessians, input_hessians
from compressor.quantize.config import QuantConfig, QuantConfigError, QuantSummary
from compressor.quantize.graph import measure_hessians, quantize_onnx


def prepare_model_(model, windows, config: QuantConfig) -> dict | None:
    """Torch-side preparation before export: none is needed by the algorithms here (GPTQ works on
    the graph's own MatMul inputs), so the model is left untouched and None is returned."""
    config.validate()
    return None


__all__ = ["Hessians", "QuantConfig", "QuantConfigError", "QuantSummary", "input_hessians", "measure_hessians", "prepare_model_", "quantize_onnx"]
