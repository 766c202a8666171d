"""A whole benchmark of one model, or of two in alternation: latency, then perplexity.

The result is a serializable dataclass; `to_dict()` is what `compress bench` writes to
bench.json. Its keys are stable: `backend`, `device`, `versions`, `settings`, `size_bytes`,
`memory`, `perplexity` {perplexity, nll, tokens, max_length, stride, windows, text},
`prefill` [{batch, seq, p50_ms, p90_ms, mean_ms, tokens_per_s, ...}],
`decode` [{batch, prompt, new_tokens, p50_ms, ... per token}], and with a second model
`compare` {other: the same document, speedup: ...}.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compressor.errors import CompressorError
from compressor.evaluate.backends import Backend, get_backend
from compressor.evaluate.latency import (
    TimingConfig,
    decode_entry,
    decode_trial,
    measure,
    memory_report,
    parse_decode,
    parse_prefill,
    prefill_entry,
    prefill_trial,
)
from compressor.evaluate.perplexity import load_eval_tokens, perplexity
from compressor.util.progress import status

log = logging.getLogger(__name__)

SCHEMA = "compressor.bench/1"
BUNDLED_EVAL_TOKENS = 16384  # the bundled text is long; cap it unless the caller says otherwise
SPEEDUP_MEANS = "A time / B time (A: the benchmarked model, B: --compare); above 1 means B is faster"


@dataclass
class BenchConfig:
    prefill: str = "1x128,1x512"
    decode: str = "128+64"
    timing: TimingConfig = field(default_factory=TimingConfig)
    perplexity: bool = True
    eval_path: Path | None = None  # None: the bundled text
    field: str = "text"
    max_length: int = 512
    stride: int = 256
    max_eval_tokens: int | None = None
    batch_size: int = 1


@dataclass
class BenchResult:
    model: str
    backend: str
    device: str
    blocks: int
    versions: dict
    settings: dict
    size_bytes: int | None
    memory: dict
    timing: dict
    perplexity: dict | None = None
    prefill: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> BenchResult:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Comparison:
    a: BenchResult
    b: BenchResult
    speedup: dict

    def to_dict(self) -> dict:
        return {**self.a.to_dict(), "compare": {"other": self.b.to_dict(), "speedup": self.speedup}}


def run_bench(model, other=None, backend: str = "auto", device: str = "cpu", threads: int | None = None,
              config: BenchConfig | None = None, tokenizer=None, labels: tuple[str, ...] | None = None,
              **options) -> BenchResult | Comparison:
    """Benchmark `model` (and `other`, in alternation) on a backend: what `compress bench` does.

    model, other: specs or paths (see `get_backend`), or loaded torch modules (then give `labels`).
    Returns a BenchResult, or with `other` a Comparison whose speedups are A time / B time.
    """
    config = config or BenchConfig()
    parse_prefill(config.prefill), parse_decode(config.decode)  # bad shapes fail before loading
    models = [model] if other is None else [model, other]
    labels = labels or tuple(str(m) if isinstance(m, (str, Path)) else type(m).__name__ for m in models)
    with contextlib.ExitStack() as opened:  # closing puts back the process-wide thread count
        backends = []
        for spec in models:
            if isinstance(spec, (str, Path)):
                status(f"loading {spec} ({backend})")
            backends.append(opened.enter_context(get_backend(backend, spec, device=device, threads=threads,
                                                             **options)))
        results = benchmark(backends, list(labels), config, tokenizer)
    if other is None:
        return results[0]
    return Comparison(results[0], results[1], speedups(results[0], results[1]))


def benchmark(backends: list[Backend], labels: list[str], config: BenchConfig,
              tokenizer=None) -> list[BenchResult]:
    """Latency of every backend measured in alternation, then perplexity of each. The backends are
    closed afterwards, so the thread count a measurement pinned does not outlive it (a backend used
    again pins it again)."""
    try:
        return _measure(backends, labels, config, tokenizer)
    finally:
        for backend in backends:
            backend.close()


def _measure(backends: list[Backend], labels: list[str], config: BenchConfig, tokenizer) -> list[BenchResult]:
    timing = config.timing
    prefill_entries: list[list[dict]] = [[] for _ in backends]
    decode_entries: list[list[dict]] = [[] for _ in backends]
    for spec in parse_prefill(config.prefill):
        status(f"timing prefill {spec.label}")
        samples = measure([prefill_trial(b, spec, timing.seed) for b in backends], timing)
        for entries, taken in zip(prefill_entries, samples):
            entries.append(prefill_entry(spec, taken))
    for spec in parse_decode(config.decode):
        status(f"timing decode {spec.label}")
        trials = [decode_trial(b, spec, timing.seed, timing.warmup_decode_tokens) for b in backends]
        every_position = replace(timing, min_runs=max(timing.min_runs, spec.new_tokens))
        for entries, taken in zip(decode_entries, measure(trials, every_position)):
            entries.append(decode_entry(spec, taken))
    results = []
    for i, (backend, label) in enumerate(zip(backends, labels)):
        ppl = None
        if config.perplexity:
            status(f"perplexity of {label}")
            ppl = _perplexity(backend, config, tokenizer)
        results.append(BenchResult(
            model=label, backend=backend.name, device=backend.device, blocks=backend.num_blocks,
            versions=backend.versions(), settings=backend.settings(), size_bytes=backend.size_bytes(),
            memory=memory_report(backend.device), timing=timing.to_dict(), perplexity=ppl,
            prefill=prefill_entries[i], decode=decode_entries[i],
        ))
    return results


def _perplexity(backend: Backend, config: BenchConfig, tokenizer) -> dict:
    tokenizer = tokenizer or backend.tokenizer
    if tokenizer is None:
        raise CompressorError(
            f"no tokenizer found for the {backend.name} model: pass --tokenizer MODEL_DIR, or --no-perplexity"
        )
    cap = config.max_eval_tokens
    if cap is None and config.eval_path is None:
        cap = BUNDLED_EVAL_TOKENS
    tokens = load_eval_tokens(tokenizer, config.eval_path, config.field, cap)
    result = perplexity(backend, tokens, config.max_length, config.stride, config.batch_size)
    text = str(config.eval_path) if config.eval_path is not None else "bundled (pydoc topics)"
    return {**result.to_dict(), "text": text, "text_tokens": int(tokens.numel())}


def speedups(a: BenchResult, b: BenchResult) -> dict:
    """Ratios users quote: A's time over B's, per workload, on the median and the mean."""

    def ratio(x: float, y: float) -> float | None:
        return x / y if y else None

    def pair(ea: dict, eb: dict, keys: tuple[str, ...]) -> dict:
        return {**{k: ea[k] for k in keys}, "p50": ratio(ea["p50_ms"], eb["p50_ms"]),
                "mean": ratio(ea["mean_ms"], eb["mean_ms"])}

    data: dict = {
        "means": SPEEDUP_MEANS,
        "prefill": [pair(x, y, ("batch", "seq")) for x, y in zip(a.prefill, b.prefill)],
        "decode": [pair(x, y, ("batch", "prompt", "new_tokens")) for x, y in zip(a.decode, b.decode)],
    }
    if a.perplexity and b.perplexity:
        data["perplexity_ratio"] = b.perplexity["perplexity"] / a.perplexity["perplexity"]
    return data
