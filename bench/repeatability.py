"""Is `compress bench --compare` repeatable? The same model against itself, twice.

Each run loads the model twice and times the copies in alternation, exactly as
`compress bench MODEL --compare MODEL` does; the speedup (A time / B time) should be 1. Goal:
within 0.97-1.03 for prefill 1x512 on a 2-core machine, in both runs.

    .venv/bin/python bench/repeatability.py --threads 2
    .venv/bin/python bench/repeatability.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from compressor.evaluate import BenchConfig, TimingConfig, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill", default="1x512")
    parser.add_argument("--decode", default="none")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--min-runs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1x128 and little time: a smoke run.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()
    if args.quick:
        args.prefill, args.min_seconds, args.min_runs = "1x128", 1.0, 5
    timing = TimingConfig(warmup=2, min_runs=args.min_runs, min_seconds=args.min_seconds)
    config = BenchConfig(prefill=args.prefill, decode=args.decode, timing=timing, perplexity=False)
    results = []
    for run in range(args.runs):
        comparison = run_bench(args.model, args.model, "torch", "cpu", args.threads, config)
        for part in ("prefill", "decode"):
            for e, a in zip(comparison.speedup[part], getattr(comparison.a, part)):
                shape = f"{e['batch']}x{e['seq']}" if part == "prefill" else \
                    f"{e['batch']}x{e['prompt']}+{e['new_tokens']}"
                ok = 0.97 <= e["p50"] <= 1.03
                print(f"run {run + 1}: {part} {shape}: A/B p50 {e['p50']:.4f}, mean {e['mean']:.4f} "
                      f"({a['runs']} samples each, A p50 {a['p50_ms']:.1f} ms) {'ok' if ok else 'OUTSIDE 0.97-1.03'}")
                results.append({"run": run + 1, "part": part, "shape": shape, **e})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
