"""Timing on the target backend: a model exported (when the backend needs it) and benchmarked against
the original in alternation, on the workload's shapes."""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.evaluate import BenchConfig, TimingConfig, benchmark, get_backend, workload_latency_ms
from compressor.pipeline.config import EXPORT_FOR_BACKEND
from compressor.util.io import atomic_dir
from compressor.util.progress import status

log = logging.getLogger(__name__)

PROBE_KEY = "probe.key"  # beside a probe export: which model (and format) it holds


def export_to(run, model, path: Path, fmt: str, validate: bool = True):
    """Export `model` into `path` (replaced atomically) as `fmt`; returns the ExportSummary."""
    from compressor.export.run import export_model

    status(f"exporting to {path.name} ({fmt})")
    with atomic_dir(path, overwrite=True) as tmp:
        summary = export_model(model, run.tokenizer, tmp, format=fmt, validate=validate, threads=run.cfg.threads)
    return summary


def backend_for(run, model, name: str):
    """A benchmark backend for `model` on the target backend, exporting it into work/NAME first when the
    backend runs an exported file (ONNX for onnxruntime, an engine for tensorrt)."""
    cfg = run.cfg
    if cfg.backend == "torch":
        from compressor.evaluate.backends import TorchBackend

        return TorchBackend(model, device=cfg.device if cfg.device != "auto" else None, threads=cfg.threads)
    from compressor.util.fingerprint import model_fingerprint

    path = run.work / name
    fmt = EXPORT_FOR_BACKEND[cfg.backend]
    # A probe folder holds one model: reuse it only for that one. The original needs no fingerprint (every
    # weight read once, repeated on each of its many probes): the work directory itself is tied to it.
    identity = "original" if model is run.model else model_fingerprint(model)
    key = f"{identity}-{fmt}"
    if not (path / "export.json").is_file() or _read(path / PROBE_KEY) != key:
        export_to(run, model, path, fmt, validate=False)
        (path / PROBE_KEY).write_text(key)
    return get_backend(cfg.backend, path, device=cfg.device, threads=cfg.threads)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def open_backend(run, path: Path):
    return get_backend(run.cfg.backend, path, device=run.cfg.device, threads=run.cfg.threads)


def workload_ms(result) -> float:
    """Latency of one workload request from a bench result: prefill p50 + new tokens x decode p50."""
    return workload_latency_ms(result.prefill[0]["p50_ms"], result.decode[0]["p50_ms"],
                               result.timing["workload_new_tokens"])


def bench_pair(run, a, b):
    """Benchmark two backends in alternation on the workload's shapes; returns (A, B) results."""
    cfg = run.cfg
    config = BenchConfig(prefill=f"{cfg.batch}x{cfg.prefill_tokens}",
                         decode=f"{cfg.batch}x{cfg.prefill_tokens}+{min(32, cfg.new_tokens)}",
                         timing=TimingConfig(min_seconds=cfg.timing_seconds), perplexity=False)
    ra, rb = benchmark([a, b], ["original", "compressed"], config, run.tokenizer)
    for r in (ra, rb):
        r.timing["workload_new_tokens"] = cfg.new_tokens
    return ra, rb


