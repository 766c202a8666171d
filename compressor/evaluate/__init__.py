"""Measuring models: perplexity, latency on PyTorch / ONNX Runtime / TensorRT, and a latency model.

    from compressor.evaluate import perplexity, load_eval_tokens, run_bench, measure_latency_model

Every number compressor reports to a user comes from here.
"""

from compressor.evaluate.backends import Backend, backend_names, get_backend, register_backend
from compressor.evaluate.benchmark import BenchConfig, BenchResult, Comparison, benchmark, run_bench, speedups
from compressor.evaluate.latency import DecodeSpec, PrefillSpec, TimingConfig, parse_decode, parse_prefill
from compressor.evaluate.latency_model import (
    LatencyModel,
    LinearCost,
    Workload,
    fit_latency_model,
    measure_latency_model,
    workload_latency_ms,
)
from compressor.evaluate.perplexity import PerplexityResult, load_eval_tokens, perplexity, plan_windows
from compressor.evaluate.stats import LatencyStats, summarize

__all__ = [
    "Backend", "BenchConfig", "BenchResult", "Comparison", "DecodeSpec", "LatencyModel", "LatencyStats",
    "LinearCost", "PerplexityResult", "PrefillSpec", "TimingConfig", "Workload", "backend_names",
    "benchmark", "fit_latency_model", "get_backend", "load_eval_tokens", "measure_latency_model",
    "parse_decode", "parse_prefill", "perplexity", "plan_windows", "register_backend", "run_bench",
    "speedups", "summarize", "workload_latency_ms",
]
