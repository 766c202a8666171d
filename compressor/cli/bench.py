from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from compressor.cli.common import (
    AllowPickleOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    OverwriteOpt,
    emit_json,
    err,
    out,
)

if TYPE_CHECKING:
    from compressor.evaluate import BenchResult, Comparison


def bench(
    model: Annotated[str, typer.Argument(help="Model directory, .gguf, 'smollm2-135m', or an ONNX export dir.")],
    backend: Annotated[str, typer.Option("--backend", help="torch, onnxruntime, tensorrt or auto.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: DtypeOpt = "float32",
    eval_file: Annotated[Path | None, typer.Option(
        "--eval", help=".txt, .jsonl or a directory of .txt (default: bundled text, first 16k tokens).")] = None,
    field: FieldOpt = "text",
    max_length: Annotated[int, typer.Option("--max-length", help="Perplexity window, tokens.")] = 512,
    stride: Annotated[int, typer.Option("--stride", help="Perplexity window step, tokens.")] = 256,
    max_eval_tokens: Annotated[int | None, typer.Option("--max-eval-tokens", help="Evaluate the first N.")] = None,
    no_perplexity: Annotated[bool, typer.Option("--no-perplexity", help="Time only.")] = False,
    prefill: Annotated[str, typer.Option("--prefill", help="BATCHxSEQ list, or 'none'.")] = "1x128,1x512",
    decode: Annotated[str, typer.Option("--decode", help="PROMPT+NEW list (BxP+N for a batch), or 'none'.")]
    = "128+64",
    threads: Annotated[int | None, typer.Option("--threads", help="Pin CPU threads (torch and ORT).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed trials per workload.")] = 2,
    min_runs: Annotated[int, typer.Option(
        "--min-runs", help="Timed samples at least (decode: also every new token once).")] = 10,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="Measured seconds at least.")] = 2.0,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="A second model, timed in alternation with the first; prints speedups.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer dir for exports.")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Also write the results as JSON here (default: print them only).")] = None,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Perplexity and latency (prefill, decode) on PyTorch, ONNX Runtime or TensorRT.

    Prints tables (or, with --json, the results document on stdout); writes a file only with --out,
    so a second run in the same folder works like the first.
    """
    from compressor.evaluate import BenchConfig, TimingConfig, run_bench
    from compressor.loading import load_tokenizer, resolve
    from compressor.util.io import check_output, write_json

    if out_file is not None:
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
    if out_file is not None:
        write_json(out_file, data)
    if json:
        emit_json(data)
        return
    _print(result)
    if out_file is not None:
        err.print(f"wrote {out_file}")


def _print(result: BenchResult | Comparison) -> None:
    from compressor.evaluate import BenchResult, Comparison

    runs = [result] if isinstance(result, BenchResult) else [result.a, result.b]
    for label, run in zip("AB", runs):
        title = f"{run.model}" if len(runs) == 1 else f"{label}: {run.model}"
        table = Table(title=f"{title} ({run.blocks} blocks, {run.backend} on {run.device})", title_justify="left")
        for name in ("workload", "p50 ms", "p90 ms", "mean ms", "std", "runs", "tok/s"):
            table.add_column(name, justify="left" if name == "workload" else "right")
        for e in run.prefill:
            table.add_row(f"prefill {e['batch']}x{e['seq']}", *_cells(e))
        for e in run.decode:
            table.add_row(f"decode {e['batch']}x{e['prompt']}+{e['new_tokens']} /tok", *_cells(e))
        if run.prefill or run.decode:
            out.print(table)
        settings = ", ".join(f"{k} {v}" for k, v in run.settings.items())
        out.print(f"  {settings}", highlight=False, style="dim")
        if run.perplexity:
            p = run.perplexity
            out.print(f"  perplexity [bold]{p['perplexity']:.4f}[/bold] over {p['tokens']:,} tokens "
                      f"(window {p['max_length']}, stride {p['stride']}; {p['text']})", highlight=False)
    if isinstance(result, Comparison):
        _print_speedups(result)


def _print_speedups(result: Comparison) -> None:

    s = result.speedup
    table = Table(title="speedup of B over A = A time / B time (above 1: B is faster)", title_justify="left")
    for name in ("workload", "p50", "mean"):
        table.add_column(name, justify="left" if name == "workload" else "right")
    for e in s["prefill"]:
        table.add_row(f"prefill {e['batch']}x{e['seq']}", f"{e['p50']:.3f}x", f"{e['mean']:.3f}x")
    for e in s["decode"]:
        table.add_row(f"decode {e['batch']}x{e['prompt']}+{e['new_tokens']}", f"{e['p50']:.3f}x",
                      f"{e['mean']:.3f}x")
    if s["prefill"] or s["decode"]:
        out.print(table)
    if "perplexity_ratio" in s:
        out.print(f"perplexity B / A: {s['perplexity_ratio']:.4f}", highlight=False)


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def _cells(e: dict) -> list[str]:
    return [_ms(e["p50_ms"]), _ms(e["p90_ms"]), _ms(e["mean_ms"]), _ms(e["std_ms"]), str(e["runs"]),
            f"{e['tokens_per_s']:,.1f}"]
