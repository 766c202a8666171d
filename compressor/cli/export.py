from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from compressor.cli.common import (
    AllowPickleOpt,
    DataOpt,
    JsonOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    emit_json,
    err,
    out,
    parse_fraction,
)

FormatOpt = Annotated[str, typer.Option("--format", "-f", help="onnx, or tensorrt (ONNX plus an engine).")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", "-p", help="fp32, fp16 (GPU), bf16 (CUDA ONNX Runtime), int8 or int4 (weight-only "
    "MatMulNBits, CPU), fp8 (TensorRT with ModelOpt).")]
ExportDtypeOpt = Annotated[str | None, typer.Option("--dtype", hidden=True, help="Old name of --precision.")]
RouteOpt = Annotated[str, typer.Option("--route", help="auto (onnxruntime-genai's builder where it supports the "
                                       "model, else torch.onnx), builder, or dynamo.")]
_Q = "int8/int4: "
_RANGE = "MIN:OPT:MAX for the TensorRT profile"


def export(
    model: ModelArg,
    out_dir: OutOpt,
    format: FormatOpt = "onnx",
    precision: PrecisionOpt = "fp32",
    route: RouteOpt = "auto",
    block_size: Annotated[int, typer.Option("--block-size", help=_Q + "weights per scale.")] = 32,
    grid: Annotated[str, typer.Option("--grid", help=_Q + "auto (minmax for int4, symmetric for int8), symmetric "
                                      "(no zero points), asymmetric (ORT's integer zero points) or minmax (each "
                                      "block's own range, float zero points).")] = "auto",
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", hidden=True,
                                                   help="Old names of --grid symmetric / asymmetric.")] = None,
    embeddings: Annotated[str, typer.Option("--embeddings", help=_Q + "auto (quantize the embedding table, shared "
                                            "with a tied lm_head) or float.")] = "auto",
    data: DataOpt = None,
    eval_file: Annotated[Path | None, typer.Option(
        "--eval", help="int8/int4: text the quality bounds are scored on (.txt, .jsonl or a directory of .txt; "
        "default: the held-out end of --data, which calibration never reads).")] = None,
    accuracy_level: Annotated[int, typer.Option("--accuracy-level", help=_Q + "MatMulNBits compute type "
                                                "(1 fp32, 2 fp16, 3 bf16, 4 int8).")] = 4,
    quant_algorithm: Annotated[str, typer.Option("--quant-algorithm", help=_Q + "rtn, gptq, mse, or auto "
                                                 "(compressor.quantize's measured default).")] = "auto",
    keep_int8: Annotated[str, typer.Option("--keep-int8", help="int4: MatMuls kept at int8: none, lm_head, "
                                           "auto (lm_head and the most sensitive ones), or node names "
                                           "(comma-separated).")] = "auto",
    int8_fraction: Annotated[float | None, typer.Option("--int8-fraction", help="int4 with --keep-int8 auto: share "
                                                        "of the other MatMuls' weights kept at int8 (default: "
                                                        "compressor.quantize's measured 0.17).")] = None,
    max_ppl_increase: Annotated[str | None, typer.Option("--max-ppl-increase", help=_Q + "allowed perplexity rise, "
                                                         "a percentage or a fraction (default: int8 2%, int4 25%).")] = None,
    min_top1: Annotated[float | None, typer.Option("--min-top1", help=_Q + "least top-1 agreement with PyTorch "
                                                   "(default: int8 0.9, int4 0.7).")] = None,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help=_Q + "largest mean KL in nats "
                                                 "(default: int8 0.05, int4 0.3).")] = None,
    dtype: ExportDtypeOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (18 or newer).")] = 18,
    optimize: Annotated[bool, typer.Option("--optimize", help="Also save ONNX Runtime's optimised graph.")] = False,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Compare with PyTorch.")] = True,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Keep an export that fails "
                                                 "validation (with a warning).")] = False,
    trt_batch: Annotated[str | None, typer.Option("--trt-batch", help=f"Batch {_RANGE} [1:1:8].")] = None,
    trt_seq: Annotated[str | None, typer.Option("--trt-seq", help=f"New tokens {_RANGE} [1:128:512].")] = None,
    trt_past: Annotated[str | None, typer.Option("--trt-past", help=f"Cached tokens {_RANGE} [0:256:1024].")] = None,
    trt_workspace_gb: Annotated[float | None, typer.Option("--trt-workspace-gb", help="TensorRT workspace limit.")] = None,
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    json: JsonOpt = False,
) -> None:
    """Export to ONNX (with KV cache, an onnxruntime-genai folder) or a TensorRT engine, validated."""
    from compressor.data import load_texts
    from compressor.export.run import check_export_options, export_model, quant_options
    from compressor.loading import load_model
    from compressor.util.io import atomic_dir, check_output

    precision = check_export_options(format, dtype or precision, opset, route)
    budget = None if max_ppl_increase is None else 100 * parse_fraction(max_ppl_increase, "--max-ppl-increase")
    if symmetric is not None:
        grid = "symmetric" if symmetric else "asymmetric"
    quant, bounds = quant_options(precision, block_size, grid, accuracy_level, quant_algorithm, keep_int8,
                                  budget, min_top1, max_kl, embeddings, int8_fraction)  # quant_options takes percent
    profile = None
    if format == "tensorrt":
        from compressor.export.tensorrt import TrtProfile

        profile = TrtProfile.parse(trt_batch, trt_seq, trt_past)
    check_output(out_dir, overwrite)
    for text in (data, eval_file):  # a missing or empty text is found before any model is loaded
        if text is not None:
            load_texts(text)
    loaded, tokenizer = load_model(model, dtype="float32", allow_pickle=allow_pickle)
    with atomic_dir(out_dir, overwrite) as tmp:
        summary = export_model(loaded, tokenizer, tmp, format=format, precision=precision, route=route,
                               quant=quant, bounds=bounds, opset=opset, optimize=optimize, validate=validate,
                               allow_mismatch=allow_mismatch, profile=profile, workspace_gb=trt_workspace_gb,
                               data=data, eval=eval_file)
    data = {"out": str(out_dir), **summary.to_dict()}
    if json:
        emit_json(data)
        return
    _print_summary(data)


def _print_summary(data: dict) -> None:
    record = data["record"]
    err.print(f"wrote {data['out']}: {data['format']}, {data['precision']} via {data['route']}, "
              f"{data['num_layers']} of "
              f"{record['blocks_original']} blocks, model.onnx {data['onnx_size_bytes'] / 1e6:,.1f} MB"
              + (f", optimised {data['optimized_size_bytes'] / 1e6:,.1f} MB" if data["optimized_size_bytes"] else "")
              + (f", engine {data['engine']['size_bytes'] / 1e6:,.1f} MB" if data["engine"] else "")
              + f" in {data['seconds']:.0f} s")
    reports = [data["validation"], (data["validation"] or {}).get("optimized"), data["engine_validation"]]
    for report in filter(None, reports):
        if report.get("kind") == "quantized":
            err.print(f"{data['precision']} vs PyTorch fp32: {report['summary']}")
        else:
            out.print(_table(report))
    for warning in data["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}")


def _table(report: dict) -> Table:
    tol = report["tolerance"]
    table = Table(title=f"{Path(report['file']).name} vs PyTorch ({report['runtime']}, {report['dtype']}, "
                        f"tolerance {tol['abs']:g} + {tol['rel']:g} x scale)")
    for column in ("case", "batch", "new", "past", "max |Δ logits|", "rel", "max |Δ cache|", "rel", "ok"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for case in report["cases"]:
        table.add_row(case["name"], str(case["batch"]), str(case["seq"]), str(case["past"]),
                      f"{case['logits_max_abs']:.2e}", f"{case['logits_max_rel']:.1e}",
                      f"{case['present_max_abs']:.2e}", f"{case['present_max_rel']:.1e}",
                      "[green]yes[/green]" if case["passed"] else "[red]NO[/red]")
    greedy = report.get("greedy")
    if greedy:
        table.add_row("greedy tokens", "1", "", "", f"{greedy['matched']}/{greedy['tokens']} identical", "", "", "",
                      "[green]yes[/green]" if greedy["passed"] else "[red]NO[/red]")
    for note in report.get("notes", []):
        table.add_row(f"[dim]{note}[/dim]")
    return table
