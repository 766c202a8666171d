"""Quality table: perplexity of every selection strategy, with and without linear maps.

SmolLM2-135M, calibrated on ../shared/data/wiki.train.txt, scored on wiki.test.txt with strided
windows (512/256), K = 3, 6, 9 of 30 blocks, next to the unpruned model. Training-free.

    .venv/bin/python bench/quality.py --eval-tokens 16384 --out bench/quality.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.data import load_texts, make_windows
from compressor.evaluate import load_eval_tokens
from compressor.loading import load_model
from compressor.select.compare import DEFAULT_STRATEGIES, compare_strategies

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=Path, default=SHARED / "wiki.train.txt")
    parser.add_argument("--eval", type=Path, default=SHARED / "wiki.test.txt")
    parser.add_argument("--ks", default="3,6,9")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("compressor").setLevel(logging.INFO)
    model, tokenizer = load_model(args.model)
    windows = make_windows(tokenizer, load_texts(args.train), args.samples, args.seq_len, args.seed)
    eval_ids = load_eval_tokens(tokenizer, args.eval, max_tokens=args.eval_tokens)
    start = time.perf_counter()
    rows = []

    def on_row(row) -> None:  # progress on stderr, and partial results on disk as they come
        print(f"# K={row.k} {row.label}: {row.perplexity:.2f} removed {row.drop} spans {row.linearize} "
              f"({row.seconds:.0f} s, {row.loss_evaluations} loss evaluations)", file=sys.stderr, flush=True)
        rows.append(asdict(row))
        if args.out:
            args.out.write_text(json.dumps({"partial": rows}, indent=2) + "\n")

    result = compare_strategies(model, windows, eval_ids, [int(k) for k in args.ks.split(",")],
                                args.strategies.split(","), variants=(True, False), on_row=on_row)
    print(result.markdown())
    for k in sorted({r.k for r in result.rows}):
        best = result.best(k)
        plain = [r for r in result.rows if r.k == k and not r.linear and r.strategy in ("influence", "angular", "greedy")]
        if plain:
            ref = min(plain, key=lambda r: r.perplexity)
            print(f"K={k}: best {best.label} {best.perplexity:.2f}; vs best of influence/angular/greedy without maps "
                  f"({ref.label} {ref.perplexity:.2f}): {100 * (1 - best.perplexity / ref.perplexity):.1f}% lower")
    print(f"total {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")
    if args.out:
        args.out.write_text(json.dumps(result.to_dict() | {"args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
