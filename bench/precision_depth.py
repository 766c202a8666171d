"""Precision x depth on SmolLM2: what `compress model --precision auto` chooses, against its baselines.

Each run is one `compressor.compress` call: it measures the quantize-only points (every precision the
backend runs, on the unpruned model), the depth-only point at fp32 and its choice, all in that run,
each speedup against the original fp32 model in alternation. Calibration and healing on
wiki.train.txt, perplexity on wiki.test.txt (the first --eval-tokens tokens, strided 512/256).

    python bench/precision_depth.py                      # targets 2.0 and 3.0, each twice
    python bench/precision_depth.py --targets 2.0 --repeat 1 --sweep 0,20%,40%

Prints one table per run and the goals of issue 20 with their measured values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("COMPRESSOR_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="2.0,3.0")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sweep", default="", help="sweep levels, e.g. 0,20%%,40%% (one extra run at the first target)")
    parser.add_argument("--heal-minutes", type=float, default=4.0)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh-timings", action="store_true",
                        help="measure every probe in every run (by default a repeat reuses the timing cache, as "
                             "compress model does)")
    parser.add_argument("--json", type=Path, help="also write every report here (a JSON list)")
    args = parser.parse_args()

    import compressor
    from compressor.cli.common import parse_fractions
    from compressor.report import baseline_header, baseline_rows, headline

    train, test = DATA / "wiki.train.txt", DATA / "wiki.test.txt"
    if not train.is_file() or not test.is_file():
        print(f"needs {train} and {test}", file=sys.stderr)
        return 2
    settings = {"data": train, "eval": (test,), "threads": args.threads, "heal_minutes": args.heal_minutes,
                    "eval_max_tokens": args.eval_tokens, "fresh_timings": args.fresh_timings}
    runs = [(float(t), None) for t in args.targets.split(",") for _ in range(args.repeat)]
    if args.sweep:
        runs.append((float(args.targets.split(",")[0]), parse_fractions(args.sweep, "--sweep")))
    reports = []
    for target, sweep in runs:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
            try:
                report = compressor.compress(args.model, target_speedup=target, out=Path(tmp) / "run",
                                             sweep=sweep or (), **settings)
            except compressor.CompressorError as exc:
                print(f"\n## target {target:.2f}x: {exc}", flush=True)
                reports.append({"target": target, "error": str(exc)})
                continue
        minutes = (time.perf_counter() - start) / 60
        print(f"\n## target {target:.2f}x{' with sweep' if sweep else ''} ({minutes:.1f} min)\n{headline(report)}")
        print("| " + " | ".join(baseline_header(report)) + " |")
        for row in baseline_rows(report):
            print("| " + " | ".join(row) + " |")
        if sweep:
            print(_sweep_check(report))
        reports.append(report.to_dict())
        sys.stdout.flush()
    print("\n## goals")
    for target, limit in ((2.0, 0.01), (3.0, 0.25)):
        mine = [r for r in reports if r.get("target_speedup") == target]
        for r in mine:
            increase = next(iter(r["perplexity_increase"].values()))
            print(f"target {target:.1f}x: {r['precision']} with {len(r['blocks_removed'])} blocks removed, "
                  f"{r['speedup_measured']:.3f}x, perplexity {increase:+.2%} (goal <= {limit:+.0%}): "
                  f"{'met' if r['target_met'] and increase <= limit else 'MISSED'}")
        choices = {(r["precision"], len(r["blocks_removed"])) for r in mine}
        if len(mine) > 1:
            print(f"target {target:.1f}x: the same choice on {len(mine)} runs: {'yes' if len(choices) == 1 else 'NO'} "
                  f"({sorted(choices)})")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1, default=str))
    return 0


def _sweep_check(report) -> str:
    """Whether any quantize-only or depth-only point lies below the front of compressor's own points."""
    from compressor.report.figures import pareto_front, sweep_points

    name = next(iter(report.perplexity.original))
    mine = [{**point, "who": f"sweep {p.precision}-{p.blocks_removed}"}  # on the baselines' latency axis
            for p, point in zip(report.sweep or [], sweep_points(report)) if point["latency_ms"] and name in p.perplexity]
    chosen = [b for b in report.baselines if b.kind == "chosen"]
    mine += [{"latency_ms": b.latency_ms, "perplexity": b.perplexity[name], "who": "chosen"} for b in chosen]
    others = [b for b in report.baselines if b.kind != "chosen" and b.latency_ms and name in b.perplexity]
    front = pareto_front(mine)
    below = [b for b in others
             if not any(f["latency_ms"] <= b.latency_ms and f["perplexity"] <= b.perplexity[name] for f in front)]
    return ("no baseline lies below compressor's front" if not below else
            "below compressor's front: " + ", ".join(f"{b.kind} {b.precision}-{b.blocks_removed}" for b in below))


if __name__ == "__main__":
    sys.exit(main())
