from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import (
    EXIT_MISSED,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    SeedOpt,
    emit_json,
    err,
    interrupt_note,
    out,
    parse_fraction,
    parse_fractions,
)
from compressor.errors import CompressorError


def _workload(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"\s*(?:(\d+)x)?(\d+)\+(\d+)\s*", text)
    if not match:
        raise CompressorError(f"cannot read --workload '{text}': write BATCHxPREFILL+NEW, e.g. 1x512+128")
    return int(match.group(1) or 1), int(match.group(2)), int(match.group(3))


def model(
    model: Annotated[str, typer.Argument(help="Model directory, .gguf file, or 'smollm2-135m'.")] = "smollm2-135m",
    target_speedup: Annotated[float | None, typer.Option(
        "--target-speedup", help="Measured speedup to reach on the backend, e.g. 1.3.")] = None,
    max_ppl_increase: Annotated[str | None, typer.Option(
        "--max-ppl-increase", help="Instead of a speedup: the fastest plan within this perplexity increase, "
        "as a percentage or a fraction: 10% or 0.1.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: compressed-MODEL).")] = None,
    data: DataOpt = None,
    eval_files: Annotated[list[Path] | None, typer.Option(
        "--eval", help="Evaluation text (repeatable; default: held-out part of --data).")] = None,
    eval_tokens: Annotated[int, typer.Option(
        "--eval-tokens", help="Tokens of each evaluation text scored for perplexity (strided 512/256; at least 2).")] = 8192,
    backend: Annotated[str, typer.Option("--backend", help="torch, onnxruntime or tensorrt.")] = "onnxruntime",
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option(
        "--threads", help="Threads of the timed runs, 1 or more (default: all); healing uses all.")] = None,
    workload: Annotated[str, typer.Option("--workload", help="BATCHxPREFILL+NEW tokens, each at least 1.")] = "1x512+128",
    strategy: Annotated[str, typer.Option("--strategy", help="Block selection strategy.")] = "auto",
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="Healing steps (0 skips healing).")] = 60,
    heal_minutes: Annotated[float, typer.Option("--heal-minutes", help="Healing time limit.")] = 4.0,
    heal_train: Annotated[str, typer.Option(
        "--heal-train", help="What healing trains: touched (blocks next to each cut), all, norms, or lora.")] = "touched",
    heal_lr: Annotated[float | None, typer.Option(
        "--heal-lr", help="Peak healing learning rate (default: 1e-3 for touched and lora, 2e-4 for all).")] = None,
    heal_local: Annotated[float | None, typer.Option(
        "--heal-local", help="Share of healing (0-1) spent first on the blocks next to the cuts alone, trained "
        "to reproduce the original's hidden states (compress heal --local). Default: 0.5 with --heal-train "
        "touched, 0 otherwise.")] = None,
    heal_quantization_aware: Annotated[bool, typer.Option(
        "--heal-quantization-aware", help="When an int8 or int4 export is chosen, heal through its fake quantizer "
        "(compress heal --quantization-aware), so the export writes the integers healing trained. With "
        "--heal-train touched the untrained blocks are then rounded to nearest instead of GPTQ.")] = False,
    export_format: Annotated[str, typer.Option("--format", help="onnx, tensorrt or none.")] = "onnx",
    precision: Annotated[str, typer.Option(
        "--precision", help="auto: measure every precision the backend runs (ONNX Runtime on a CPU: fp32, int8, "
        "int4) on the unpruned model, then remove blocks on top only where the target needs them, keeping the "
        "combination with the lowest perplexity (under --max-ppl-increase: the fastest within it). Or pin one: "
        "fp32, fp16, int8, int4. Speedups are always against the original at fp32.")] = "auto",
    samples: Annotated[int, typer.Option("--samples", help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")] = 256,
    seed: SeedOpt = 0,
    sweep: Annotated[str | None, typer.Option(
        "--sweep", help="Also measure these levels (share of the blocks removed, training-free; percentages or "
        "fractions), e.g. 0,10%,20%,30%,40% or 0,0.1,0.2,0.3,0.4, "
        "and draw the perplexity-versus-latency curve with its Pareto front.")] = None,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="Timed seconds per model and shape.")] = 2.0,
    fresh_timings: Annotated[bool, typer.Option(
        "--fresh-timings", help="Measure every probe again. By default a probe this host timed in an earlier run "
        "(same model, probe, backend, workload and versions) is taken from the timing cache, so reruns decide "
        "alike; the final benchmark is always measured.")] = False,
    search_windows: Annotated[int, typer.Option(
        "--search-windows", help="auto: calibration windows its maps are fitted on while it searches "
        "(bounds its cost; 0: all). The chosen plan is fitted on all windows.")] = 16,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Compress a model to a target speedup (or perplexity budget): measure each precision, choose precision and
    depth together, calibrate, plan, prune, heal, export, report.

    The report compares the choice with quantizing alone (every precision the backend runs) and with removing
    blocks alone at fp32, on one perplexity-versus-latency figure.

    Exit codes: 0 the target was met, 1 the run finished but missed it, 2 bad input (found before any
    work; nothing is left behind) or a failure after the first stage such as an unreachable target
    (the work directory .OUT.work is kept), 3 internal error, 130 interrupted by Ctrl-C or SIGTERM
    (.OUT.work is kept). A rerun of the same command resumes the finished stages.
    """
    import compressor
    from compressor.pipeline import work_dir

    batch, prefill, new = _workload(workload)
    if precision.lower() != "auto":
        from compressor.export.run import parse_precision

        precision = parse_precision(precision)
    budget = None if max_ppl_increase is None else parse_fraction(max_ppl_increase, "--max-ppl-increase")
    levels = parse_fractions(sweep, "--sweep") if sweep else ()
    target = out_dir or Path(f"compressed-{Path(model).name.removesuffix('.gguf')}")
    interrupt_note(f"the work directory {work_dir(target)} is kept: rerun the same command to resume")
    report = compressor.compress(
        model, target_speedup=target_speedup, max_ppl_increase=budget, out=target,
        overwrite=overwrite, data=data, eval=tuple(eval_files or ()), backend=backend, device=device,
        threads=threads, prefill_tokens=prefill, new_tokens=new, batch=batch, strategy=strategy,
        heal_steps=heal_steps, heal_minutes=heal_minutes, heal_train=heal_train, heal_lr=heal_lr,
        heal_local=heal_local, heal_quantization_aware=heal_quantization_aware,
        format=export_format, precision=precision.lower(), samples=samples, seq_len=seq_len, seed=seed, timing_seconds=min_seconds,
        fresh_timings=fresh_timings,
        sweep=levels, search_windows=search_windows, eval_max_tokens=eval_tokens)
    if json:
        emit_json(report.to_dict())
    else:
        from compressor.report import headline

        out.print(f"[bold]{headline(report)}[/bold]", highlight=False)
        err.print(f"reports: {target / 'report.md'}, {target / 'report.html'}")
    if not report.target_met:
        raise typer.Exit(EXIT_MISSED)  # a pipeline step must not pass on a missed target
