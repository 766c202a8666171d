"""Timing on the target backend: a model exported (when the backend needs it, at a precision) and
benchmarked against the original fp32 model in alternation, on the workload's shapes.

One protocol serves every speedup a run decides on or reports (the depth probes, the precision
points, the sweep and the final benchmark): `measure_speedup` measures a pair once and, while the
speedup lies within its measured spread (or REMEASURE_BAND) of the target, again (MAX_ROUNDS in all),
keeping the median round; `measure_together` does the same for several models in one alternation (the
precision points). Every speedup carries its spread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from compressor.evaluate import BenchConfig, TimingConfig, benchmark, get_backend, workload_latency_ms
from compressor.pipeline.config import EXPORT_FOR_BACKEND
from compressor.util.io import atomic_dir
from compressor.util.progress import status

log = logging.getLogger(__name__)

# Beside a probe export: which model (and format, precision) it holds. Hidden, so that an export
# starting from the probe's float graph leaves it behind (export_model's float_graph).
PROBE_KEY = ".probe.key"
# A speedup this close to the target (or within its own measured spread) is measured again before a
# decision rests on it: repeated measurements of one pair vary by a few percent on a busy CPU (a
# probe of one depth measured up to 4% more than the final benchmark of the same depth in one run).
REMEASURE_BAND = 0.05
MAX_ROUNDS = 3
# Timed prefills per model and round (decode takes one sample per position, 32 or more): the prefill is a
# small share of the workload (512 + 128 tokens: about an eighth on SmolLM2), so five samples bound its
# median well enough, and the sixth to tenth would cost more than the decoding measured beside them.
PREFILL_RUNS = 5
# Test seam: workload latency multiplied per precision, so a test can make one precision slower.
SLOWDOWN: dict[str, float] = {}


def export_to(run, model, path: Path, fmt: str, validate: bool = True, precision: str = "fp32", quant=None,
              model_id: str | None = None):
    """Export `model` into `path` (replaced atomically) as `fmt` at `precision`; returns the ExportSummary.
    A quantized export calibrates on the run's text (--data) and is validated on its held-out end; it
    quantizes the fp32 graph of a probe that holds the same model, when there is one, instead of
    exporting the model again. model_id: `identity(run, model)`, when the caller has it."""
    from compressor.export.run import export_model

    model_id = model_id or identity(run, model)
    quantized = precision in ("int8", "int4")
    graph = float_graph(run, model_id, fmt) if quantized else None
    # the delivered quantization of this very model, already made by a probe (the unpruned model's
    # quantize-only point, when a precision alone meets the target): validated, not made again
    same = probe_holding(run, probe_key(model_id, fmt, precision, quant)) if quantized and validate else None
    status(f"exporting to {path.name} ({fmt}, {precision})"
           + (f" from {same.name}" if same else f" from {graph.name}'s graph" if graph else ""))
    with atomic_dir(path, overwrite=True) as tmp:
        summary = export_model(model, run.tokenizer, tmp, format=fmt, precision=precision, quant=quant,
                               validate=validate, threads=run.cfg.threads, data=run.cfg.data, float_graph=graph,
                               quantized_copy=same)
    return summary


def identity(run, model) -> str:
    """What a probe folder's key says of the model it holds. The original needs no fingerprint (every
    weight read once, repeated on each of its many probes): the work directory itself is tied to it."""
    from compressor.util.fingerprint import model_fingerprint

    return "original" if model is run.model else model_fingerprint(model)


def float_graph(run, model_identity: str, fmt: str) -> Path | None:
    """A probe folder of this run holding `model_identity`'s fp32 ONNX graph, or None."""
    return probe_holding(run, f"{model_identity}-{fmt}-fp32-") if fmt == "onnx" else None


def probe_key(model_identity: str, fmt: str, precision: str, quant) -> str:
    """What a probe folder's key says: the model, format, precision and quantization it holds."""
    return f"{model_identity}-{fmt}-{precision}-{'default' if quant is None else quant.algorithm}"


def probe_holding(run, key: str) -> Path | None:
    """A finished probe folder of this run whose key starts with `key`, or None."""
    if not run.work.is_dir():
        return None
    for path in sorted(run.work.glob(f"*/{PROBE_KEY}")):
        if (_read(path) or "").startswith(key) and (path.parent / "export.json").is_file():
            return path.parent
    return None


def probe_quant(precision: str):
    """How a timing probe is quantized: round to nearest (the same graph, sizes and kernels as the
    delivered export, without its calibration cost); None for float precisions."""
    if precision not in ("int8", "int4"):
        return None
    from compressor.quantize import QuantConfig

    return QuantConfig(algorithm="rtn")


def backend_for(run, model, name: str, precision: str = "fp32", quant="probe"):
    """A benchmark backend for `model` on the target backend, exporting it into work/NAME first (at
    `precision`; `quant` "probe" is `probe_quant`'s fast rounding, None the export's default) when the
    backend runs an exported file (ONNX for onnxruntime, an engine for tensorrt)."""
    cfg = run.cfg
    if cfg.backend == "torch":
        from compressor.evaluate.backends import TorchBackend

        backend = TorchBackend(model, device=cfg.device if cfg.device != "auto" else None, threads=cfg.threads)
        run.backends.append(backend)
        return backend
    path = run.work / name
    fmt = EXPORT_FOR_BACKEND[cfg.backend]
    # A probe folder holds one model: reuse it only for that one.
    quant = probe_quant(precision) if quant == "probe" else quant
    model_id = identity(run, model)
    key = probe_key(model_id, fmt, precision, quant)
    if not (path / "export.json").is_file() or _read(path / PROBE_KEY) != key:
        export_to(run, model, path, fmt, validate=False, precision=precision, quant=quant, model_id=model_id)
        (path / PROBE_KEY).write_text(key)
    return open_backend(run, path, precision)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def open_backend(run, path: Path, precision: str = "fp32"):
    """The target backend on an exported file; the run closes it when it ends (`Run.close_backends`)."""
    backend = get_backend(run.cfg.backend, path, device=run.cfg.device, threads=run.cfg.threads)
    backend.precision = precision
    run.backends.append(backend)
    return backend


def workload_ms(result) -> float:
    """Latency of one workload request from a bench result: prefill p50 + new tokens x decode p50."""
    return workload_latency_ms(result.prefill[0]["p50_ms"], result.decode[0]["p50_ms"],
                               result.timing["workload_new_tokens"]) * result.timing.get("slowdown", 1.0)


def workload_spread(result) -> float:
    """Relative standard error of `workload_ms`: the medians' standard errors (1.25 sigma / sqrt(runs)),
    sigma read robustly from the upper tail ((p90 - p50) / 1.28, as for a normal distribution) so that a
    few samples disturbed by another process do not swamp it."""
    def se(entry: dict) -> float:
        return 1.2533 * (entry["p90_ms"] - entry["p50_ms"]) / 1.2816 / math.sqrt(max(entry["runs"], 1))

    prefill, decode = result.prefill[0], result.decode[0]
    new = result.timing["workload_new_tokens"]
    total = prefill["p50_ms"] + new * decode["p50_ms"]
    return math.hypot(se(prefill), new * se(decode)) / total if total > 0 else 0.0


@dataclass
class Speedup:
    """A measured speedup (original time / model time) with its spread (two standard errors, relative to
    the speedup, or half the range of the rounds when measured more than once) and the rounds' values."""

    value: float
    spread: float
    rounds: list[float]
    original_ms: float
    model_ms: float

    def text(self) -> str:
        return f"{self.value:.3f}x +-{self.spread * self.value:.3f}"

    def against(self, target: float) -> str:
        """"met"; "within the noise": short of `target`, which lies inside the measured spread, so the
        measurement cannot tell this from a pass (the probe of the same graph may have measured above it);
        or "missed": short by more than the spread."""
        if self.value >= target:
            return "met"
        return "within the noise" if self.value * (1 + self.spread) >= target else "missed"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measure_speedup(run, original, model, target: float | None = None,
                    short_again: bool = False) -> tuple[Speedup, tuple]:
    """(Speedup, the median round's (original, model) results) of `model` against `original`; a speedup
    within its spread (at least REMEASURE_BAND) of `target` is measured again, MAX_ROUNDS in all; with
    `short_again` (the final benchmark), so is any speedup short of it: a miss is declared on the median."""
    return _median(repeat(lambda: bench_pair(run, original, model), _ratio, target,
                          band=lambda pair: max(REMEASURE_BAND, _pair_spread(pair)), short_again=short_again))


def measure_together(run, original, models: dict, target: float | None = None) -> dict[str, Speedup]:
    """The Speedup of each of `models` (name -> backend) against `original`, all timed in one alternation, so
    that the machine's drift hits them alike and the original is timed once a round for all of them. While
    any of them lies within its spread (at least REMEASURE_BAND) of `target`, all are measured again
    (MAX_ROUNDS rounds in all); each keeps its own median round."""
    names = list(models)

    def one_round() -> dict:
        results = bench_group(run, [original, *models.values()], ["original", *names])
        return {name: (results[0], r) for name, r in zip(names, results[1:])}

    def nearest(group: dict):  # the pair nearest the target decides whether the group is measured again
        return min(group.values(), key=lambda pair: abs(_ratio(pair) / target - 1) if target else 0.0)

    rounds = repeat(one_round, lambda group: _ratio(nearest(group)), target,
                    band=lambda group: max(REMEASURE_BAND, _pair_spread(nearest(group))))
    return {name: _median([group[name] for group in rounds])[0] for name in names}


def _median(pairs: list) -> tuple[Speedup, tuple]:
    """The round of one pair with the median speedup, as a Speedup whose spread is at least half the rounds'
    range, and that round's (original, model) results."""
    pairs = sorted(pairs, key=_ratio)
    ra, rb = pairs[len(pairs) // 2]
    values = [_ratio(pair) for pair in pairs]
    spread = max(_pair_spread((ra, rb)), (values[-1] - values[0]) / 2 / _ratio((ra, rb)))
    return Speedup(_ratio((ra, rb)), spread, values, workload_ms(ra), workload_ms(rb)), (ra, rb)


def _ratio(pair) -> float:
    return workload_ms(pair[0]) / workload_ms(pair[1])


def _pair_spread(pair) -> float:
    return 2 * math.hypot(workload_spread(pair[0]), workload_spread(pair[1]))


def repeat(measure, speedup, target: float | None, band=lambda _: REMEASURE_BAND, short_again: bool = False) -> list:
    """Measure once; while the speedup lies within `band` (a fraction, of the result) of `target` on either
    side, or with `short_again` anywhere short of it, measure again (MAX_ROUNDS in all). Returns every round."""
    def why_again(last) -> str | None:
        if abs(speedup(last) / target - 1) < band(last):
            return "is within the noise of"
        return "is short of" if short_again and speedup(last) < target else None

    rounds = [measure()]
    while target and len(rounds) < MAX_ROUNDS and (why := why_again(rounds[-1])):
        status(f"{speedup(rounds[-1]):.3f}x {why} the {target:.2f}x target: measuring again")
        rounds.append(measure())
    return rounds


def bench_pair(run, a, b):
    """Benchmark two backends in alternation on the workload's shapes; returns (A, B) results."""
    ra, rb = bench_group(run, [a, b], ["original", "compressed"])
    return ra, rb


def bench_group(run, backends: list, labels: list[str]) -> list:
    """Benchmark backends in alternation on the workload's shapes; one result each, in order."""
    cfg = run.cfg
    # Decoding covers the workload's own positions (the prompt is prefilled once per model, so a longer
    # continuation costs nothing more); one untimed prefill warms each model up before its timed ones.
    config = BenchConfig(prefill=f"{cfg.batch}x{cfg.prefill_tokens}",
                         decode=f"{cfg.batch}x{cfg.prefill_tokens}+{cfg.new_tokens}",
                         timing=TimingConfig(warmup=1, min_seconds=cfg.timing_seconds, min_runs=PREFILL_RUNS),
                         perplexity=False)
    results = benchmark(backends, labels, config, run.tokenizer)
    for r, backend in zip(results, backends):
        r.timing["workload_new_tokens"] = cfg.new_tokens
        slowdown = SLOWDOWN.get(getattr(backend, "precision", "fp32"))
        if slowdown:
            r.timing["slowdown"] = slowdown
    return results


