from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import (
    AllowPickleOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    emit_json,
    err,
)


def heal(
    student: ModelArg,
    teacher: Annotated[str, typer.Option("--teacher", help="The unpruned model the student was cut from.")],
    out: OutOpt,
    data: DataOpt = None,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Held-out text for perplexity (default: the last tenth of --data).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (at most).")] = 200,
    max_minutes: Annotated[float | None, typer.Option(
        "--max-minutes", help="Wall-time bound for the whole run; the schedule is fitted to it.")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Peak learning rate (AdamW); default 1e-3 for touched and lora, 2e-4 for all.")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warm-up steps, then cosine decay.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per micro-batch per process.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    samples: Annotated[int, typer.Option("--samples", help="Training windows drawn from --data.")] = 512,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out windows for perplexity.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature T.")] = 1.0,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help="Weight of KD against the next-token loss (0-1). Default: 0.5.")] = None,
    hidden_weight: Annotated[float, typer.Option(
        "--hidden-weight", help="Weight of the hidden-state loss (relative error per token).")] = 0.0,
    hidden_at: Annotated[str, typer.Option(
        "--hidden-at", help="Match hidden states at the cuts, or after every kept block.")] = "cuts",
    train: Annotated[str, typer.Option(
        "--train", help="touched (blocks next to cuts), all, norms (scales and biases), or lora.")] = "touched",
    reach: Annotated[int, typer.Option(
        "--reach", help="With --train touched: the kept blocks trained on each side of a cut.")] = 1,
    local: Annotated[float | None, typer.Option(
        "--local", help="Share of the time (0-1) left after the teacher's pass spent first training the "
        "touched blocks alone to reproduce the teacher's hidden states after them (cheap steps: no other "
        "block, no LM head). Default: 0.5 with --train touched, 0 otherwise.")] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank with --train lora.")] = 16,
    regularize_linearity: Annotated[float, typer.Option(
        "--regularize-linearity",
        help="Weight of the mean cosine between consecutive hidden states (e.g. 0.05).")] = 0.0,
    topk: Annotated[int, typer.Option("--topk", help="Teacher log-probabilities kept per position.")] = 64,
    teacher_cache: Annotated[str, typer.Option(
        "--teacher-cache",
        help="Cache directory, 'auto' (compressor's cache) or 'off' (live teacher).")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Save training state every N steps.")] = 50,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted run into the same --out.")] = False,
    distributed: Annotated[str, typer.Option(
        "--distributed", help="ddp or fsdp, when launched with torchrun / accelerate launch.")] = "ddp",
    autocast: Annotated[bool, typer.Option(
        "--autocast/--no-autocast",
        help="Train in bf16 autocast where native (CUDA; CPUs with AVX512-BF16 or AMX).")] = True,
    quantization_aware: Annotated[str | None, typer.Option(
        "--quantization-aware",
        help="int4 or int8: train through the weights that export precision writes (QAT); "
             "a later `compress export` of the result writes the trained integers.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    json: JsonOpt = False,
) -> None:
    """Distill the unpruned teacher into a pruned student to recover what pruning lost."""
    from compressor.cli.common import interrupt_note
    from compressor.heal.run import heal_checkpoint

    interrupt_note(f"the training state in {out.parent / f'.{out.name}.heal-state'} is kept: "
                   "rerun the same command with --resume to continue")
    result = heal_checkpoint(
        student, teacher, out, data=data, eval_data=eval_data, seq_len=seq_len, samples=samples,
        eval_samples=eval_samples, teacher_cache=teacher_cache, device=device, dtype=dtype,
        overwrite=overwrite, allow_pickle=allow_pickle,
        steps=steps, max_minutes=max_minutes, lr=lr, warmup=warmup, batch_size=batch_size,
        grad_accum=grad_accum, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
        hidden_at=hidden_at, local=local,
        regularize_linearity=regularize_linearity,
        train=train, reach=reach, lora_rank=lora_rank, topk=topk, checkpoint_every=checkpoint_every, resume=resume,
        seed=seed, distributed=distributed, autocast=autocast, quantization_aware=quantization_aware,
    )
    if not result.is_main:
        return
    if json:
        emit_json({"out": str(out), **result.to_dict()})
        return
    ppl = ""
    if result.ppl_before is not None:
        through = f" (through {result.quantization_aware['precision']} weights)" if result.quantization_aware else ""
        ppl = f", perplexity{through} {result.ppl_before:.2f} -> {result.ppl_after:.2f}"
    err.print(f"wrote {out}: {result.steps} steps in {result.seconds / 60:.1f} min "
              f"({result.tokens_per_second:.0f} tokens/s){ppl}")
    if result.quantization_aware:
        precision = result.quantization_aware["precision"]
        err.print(f"trained through {precision} weights: `compress export {out} --precision {precision}` writes them")
