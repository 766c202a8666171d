"""compressor: make transformer language models shallower and ship them to ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
