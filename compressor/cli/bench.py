from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from compressor.cli.common import AllowPickleOpt, DtypeOpt, JsonOpt, OverwriteOpt, emit_json, err, out
from compressor.evaluate import BenchConfig, BenchResult, Comparison, TimingConfig, run_bench
from compressor.io import check_output, write_json
from compressor.loading import load_tokenizer, resolve


def bench(
    model: Annotated[str, typer.Argument(help="Model directory, .gguf, 'smollm2-135m', or an ONNX export dir.")],
    backend: Annotated[str, typer.Option("--backend", help="torch, onnxruntime, tensorrt or auto.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: DtypeOpt = "float32",
    eval_file: Annotated[Path | None, typer.Option(
        "--eval", help=".txt, .jsonl or a directory of .txt (default: bundled text, first 16k tokens).")] = None,
    field: Annotated[str, typer.Option("--field", help="JSONL field holding the text.")] = "text",
    max_length: Annotated[int, typer.Option("--max-length", help="Perplexity window, tokens.")] = 512,
    stride: Annotated[int, typer.Option("--stride", help="Perplexity window step, tokens.")] = 256,
    max_eval_tokens: Annotated[int | None, typer.Option("--max-eval-tokens", help="Evaluate the first N.")] = None,
    no_perplexity: Annotated[bool, typer.Option("--no-perplexity", help="Time only.")] = False,
    prefill: Annotated[str, typer.Option("--prefill", help="BATCHxSEQ list, or 'none'.")] = "1x128,1x512",
    decode: Annotated[str, typer.Option("--decode", help="PROMPT+NEW list (BxP+N for a batch), or 'none'.")]
    = "128+64",
    threads: Annotated[int | None, typer.Option("--threads", help="Pin CPU threads (torch and ORT).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed trials per workload.")] = 2,
    min_runs: Annotated[int, typer.Option("--min-runs", help="Timed samples at least.")] = 10,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="Measured seconds at least.")] = 2.0,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="A second model, timed in alternation with the first; prints speedups.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer dir for exports.")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Where to write the results.")] = Path("bench.json"),
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Perplexity and latency (prefill, decode) on PyTorch, ONNX Runtime or TensorRT; writes bench.json."""
    check_output(out_file, overwrite)
    config = BenchConfig(
        prefill=prefill, decode=decode, perplexity=not no_perplexity, eval_path=eval_file, field=field,
        max_length=max_length, stride=stride, max_eval_tokens=max_eval_tokens,
        timing=TimingConfig(warmup=warmup, min_runs=min_runs, min_seconds=min_seconds),
    )
    tok = load_tokenizer(resolve(tokenizer)) if tokenizer else None
    result = run_bench(model, compare, backend, device, threads, config, tok,
                       dtype=dtype, compile=compile, allow_pickle=allow_pickle)
    data = result.to_dict()
    _write(out_file, data)
    if json:
        emit_json(data)
        return
    _print(result)
    err.print(f"wrote {out_file}")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    write_json(tmp, data)
    os.replace(tmp, path)


def _print(result: BenchResult | Comparison) -> None:
    runs = [result] if isinstance(result, BenchResult) else [result.a, result.b]
    table = Table(title="latency (ms; decode is per token)")
    table.add_column("model")
    for name in ("workload", "p50", "p90", "p99", "mean", "std", "runs", "tokens/s"):
        table.add_column(name, justify="left" if name == "workload" else "right")
    for run in runs:
        for e in run.prefill:
            table.add_row(_name(run), f"prefill {e['batch']}x{e['seq']}", *_cells(e))
        for e in run.decode:
            table.add_row(_name(run), f"decode {e['batch']}x{e['prompt']}+{e['new_tokens']}", *_cells(e))
    out.print(table)
    for run in runs:
        line = f"{_name(run)}: {run.blocks} blocks, {run.backend} on {run.device}, {run.settings}"
        if run.perplexity:
            p = run.perplexity
            line += (f"\n  perplexity {p['perplexity']:.4f} over {p['tokens']:,} tokens "
                     f"(windows {p['max_length']}, stride {p['stride']}; {p['text']})")
        out.print(line, highlight=False)
    if isinstance(result, Comparison):
        _print_speedups(result)


def _print_speedups(result: Comparison) -> None:
    s = result.speedup
    table = Table(title=f"speedup of {result.b.model} over {result.a.model} ({s['means']})")
    for name in ("workload", "p50", "mean"):
        table.add_column(name, justify="left" if name == "workload" else "right")
    for e in s["prefill"]:
        table.add_row(f"prefill {e['batch']}x{e['seq']}", f"{e['p50']:.3f}x", f"{e['mean']:.3f}x")
    for e in s["decode"]:
        table.add_row(f"decode {e['batch']}x{e['prompt']}+{e['new_tokens']}", f"{e['p50']:.3f}x",
                      f"{e['mean']:.3f}x")
    out.print(table)
    if "perplexity_ratio" in s:
        out.print(f"perplexity B / A: {s['perplexity_ratio']:.4f}")


def _name(run: BenchResult) -> str:
    return Path(run.model).name or run.model


def _cells(e: dict) -> list[str]:
    return [f"{e['p50_ms']:.2f}", f"{e['p90_ms']:.2f}", f"{e['p99_ms']:.2f}", f"{e['mean_ms']:.2f}",
            f"{e['std_ms']:.2f}", str(e["runs"]), f"{e['tokens_per_s']:,.1f}"]
