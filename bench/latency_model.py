"""Does the latency model predict the speedup of removing blocks? Predicted and measured, side by side.

1. Fit: measure the model at a few depths (default: full, a quarter and half of the blocks
   removed, spread over the stack) on PyTorch and fit fixed + per-block costs per workload.
2. Check: remove K blocks for real (default 6 and 12, as one contiguous span late in the stack,
   as pruning tends to choose), measure the full and pruned models in alternation, and compare
   the measured speedups with the predictions. The check depths are not among the fitted ones.

Workload: one prefill of --prefill tokens plus --new-tokens decoded at batch 1; the prefill and
the per-token decode are also reported on their own. Goal: within 5% on PyTorch CPU.

    .venv/bin/python bench/latency_model.py --threads 2 --out bench/latency_model.json
    .venv/bin/python bench/latency_model.py --quick      # a fast smoke run; numbers are rough
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from compressor.adapters import get_adapter
from compressor.evaluate import TimingConfig, Workload, measure_latency_model, workload_latency_ms
from compressor.evaluate.backends import TorchBackend
from compressor.evaluate.latency import DecodeSpec, PrefillSpec, decode_trial, measure, prefill_trial
from compressor.evaluate.latency_model import median
from compressor.loading import load_model
from compressor.surgery.edit import copy_without_blocks


def late_span(num_blocks: int, k: int) -> list[int]:
    """k contiguous blocks ending two before the last (pruning methods usually pick late blocks)."""
    end = num_blocks - 2
    return list(range(end - k, end))


def measure_pruned(model, removed: list[int], workload: Workload, timing: TimingConfig,
                   threads: int | None) -> dict[int, dict]:
    """Median prefill and per-token decode of the full model and each pruned copy, in alternation."""
    n = get_adapter(model).num_blocks(model)
    variants = [0, *removed]
    backends = [TorchBackend(copy_without_blocks(model, late_span(n, k)), threads=threads) for k in variants]
    prefill = measure([prefill_trial(b, PrefillSpec(workload.batch, workload.prefill_tokens)) for b in backends],
                      timing)
    spec = DecodeSpec(workload.batch, workload.prefill_tokens, workload.new_tokens)
    decode = measure([decode_trial(b, spec) for b in backends],
                     replace(timing, min_runs=max(timing.min_runs, workload.new_tokens)))
    return {k: {"prefill_ms": median(p), "decode_ms": median(d)} for k, p, d in zip(variants, prefill, decode)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--removed", default="6,12", help="Blocks to remove for the check.")
    parser.add_argument("--fit-removals", default=None, help="Blocks removed per fitted depth (default 0,N/4,N/2).")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=6.0)
    parser.add_argument("--min-runs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="Short prompt and little time: a smoke run.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prefill, args.new_tokens, args.min_seconds, args.min_runs = 128, 32, 0.5, 3
    workload = Workload(args.prefill, args.new_tokens)
    timing = TimingConfig(warmup=2, min_runs=args.min_runs, min_seconds=args.min_seconds)
    removed = [int(k) for k in args.removed.split(",")]
    fit_removals = tuple(int(k) for k in args.fit_removals.split(",")) if args.fit_removals else None

    model, _ = load_model(args.model)
    start = time.perf_counter()
    fitted = measure_latency_model(model, workload, fit_removals, threads=args.threads, timing=timing)
    fit_seconds = time.perf_counter() - start
    measured = measure_pruned(model, removed, workload, timing, args.threads)
    rows = report(fitted, measured, workload)
    print(f"\n{args.model}, {fitted.blocks} blocks, torch CPU, {args.threads} threads, workload {workload.label} "
          f"(fit in {fit_seconds:.0f} s at depths {[int(p[0]) for p in fitted.prefill.points]})")
    print(f"prefill: {fitted.prefill.fixed_ms:.1f} ms fixed + {fitted.prefill.per_block_ms:.2f} ms/block; "
          f"decode: {fitted.decode.fixed_ms:.2f} ms fixed + {fitted.decode.per_block_ms:.3f} ms/block per token")
    print(f"{fitted.explain()}\n")
    print(f"{'removed':>7} {'part':>9} {'predicted':>10} {'measured':>9} {'error':>7}")
    for row in rows:
        print(f"{row['removed']:>7} {row['part']:>9} {row['predicted']:>9.3f}x {row['measured']:>8.3f}x "
              f"{row['error']:>+7.1%}")
    if args.out:
        args.out.write_text(json.dumps({"latency_model": fitted.to_dict(), "measured": measured, "rows": rows,
                                        "quick": args.quick}, indent=2) + "\n")


def report(fitted, measured: dict[int, dict], workload: Workload) -> list[dict]:
    n, full = fitted.blocks, measured[0]
    rows = []
    for k, m in measured.items():
        if k == 0:
            continue
        parts = {
            "prefill": (fitted.prefill.at(n) / fitted.prefill.at(n - k), full["prefill_ms"] / m["prefill_ms"]),
            "decode": (fitted.decode.at(n) / fitted.decode.at(n - k), full["decode_ms"] / m["decode_ms"]),
            "workload": (fitted.predict_speedup(k),
                         workload_latency_ms(full["prefill_ms"], full["decode_ms"], workload.new_tokens)
                         / workload_latency_ms(m["prefill_ms"], m["decode_ms"], workload.new_tokens)),
        }
        for part, (predicted, actual) in parts.items():
            rows.append({"removed": k, "part": part, "predicted": predicted, "measured": actual,
                         "error": predicted / actual - 1})
    return rows


if __name__ == "__main__":
    main()
