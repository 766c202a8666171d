"""Healing SmolLM2-135M after removing 6 of its 30 blocks, measured in one run.

Prints perplexity on wiki.test.txt of the original, the pruned and the healed model, whether healing
recovered at least half of what pruning lost (ppl_pruned - ppl_healed >= 0.5 x (ppl_pruned -
ppl_original)), and the peak memory (RSS) of the healing process against that of the pruned model's
own plain training step (all parameters, AdamW, the same batch) measured the same way.

    python bench/heal.py                 # the plan, then at most 15 minutes of healing on 2 CPU cores
    python bench/heal.py --minutes 5     # a shorter healing budget
    python bench/heal.py --quick         # a smoke run: short eval, 1 minute of healing

Healing and the training-step baseline run in child processes (this script re-invoked with
--child), so each peak RSS is that process's own (os.wait4's ru_maxrss) and nothing else's. The
healing child goes through compressor.heal.run.heal_checkpoint, the function behind `compress heal`;
its --max-minutes budget includes computing the teacher cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
DATA = HERE.parents[1].parent / "shared" / "data"

# Healing defaults tuned for 15 CPU-minutes on SmolLM2-135M (see the README's healing section).
HEAL = {"lr": 1e-3, "warmup": 5, "batch_size": 4, "seq_len": 256, "alpha": 0.8, "temperature": 1.0,
        "train": "touched", "topk": 64}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    from compressor.data import load_texts, make_windows
    from compressor.evaluate import load_eval_tokens, perplexity
    from compressor.loading import load_model, resolve
    from compressor.surgery.edit import save_checkpoint

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    original, tokenizer = load_model(args.model)
    test_ids = load_eval_tokens(tokenizer, args.test, max_tokens=args.eval_tokens)
    calib = make_windows(tokenizer, load_texts(args.data), args.calib_samples, 256, seed=1)
    plan, how = make_or_read_plan(original, calib, args, work)
    pruned = copy.deepcopy(original)
    from compressor.surgery.plan import apply_plan_

    apply_plan_(pruned, plan)
    save_checkpoint(pruned, tokenizer, work / "pruned")

    ppl = {"original": ppl_of(perplexity, original, test_ids), "pruned": ppl_of(perplexity, pruned, test_ids)}
    del original, pruned
    plain = run_child(args, "plain", work)
    load_before = os.getloadavg()[0]
    heal = run_child(args, "heal", work, extra=["--teacher", str(resolve(args.model))])
    load = (load_before + os.getloadavg()[0]) / 2  # other processes on the machine slow healing down
    healed, _ = load_model(work / "healed", with_tokenizer=False)
    ppl["healed"] = ppl_of(perplexity, healed, test_ids)

    lost, recovered = ppl["pruned"] - ppl["original"], ppl["pruned"] - ppl["healed"]
    report = {
        "model": args.model, "plan": {"how": how, "drop": plan.drop, "linearize": plan.linearize},
        "eval_tokens": int(test_ids.numel()), "perplexity": ppl,
        "recovered_fraction": recovered / lost if lost > 0 else None,
        "goal_half_recovered": recovered >= 0.5 * lost,
        "peak_rss_mb": {"healing": heal["peak_rss_mb"], "plain_training_step": plain["peak_rss_mb"]},
        "memory_ratio": heal["peak_rss_mb"] / plain["peak_rss_mb"],
        "goal_memory_below_2.5x": heal["peak_rss_mb"] < 2.5 * plain["peak_rss_mb"],
        "heal": heal["result"], "settings": {**HEAL, "minutes": args.minutes, "threads": args.threads},
        "machine": {"cpus": os.cpu_count(), "load_average_during_healing": round(load, 2)},
    }
    print_report(report)
    (work / "bench-heal.json").write_text(json.dumps(report, indent=2))
    print(f"\nfull report: {work / 'bench-heal.json'}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drop", type=int, default=6, help="blocks to remove (default 6)")
    p.add_argument("--strategy", default="auto", help="compressor.select strategy for the plan (default auto)")
    p.add_argument("--minutes", type=float, default=None, help="healing budget (default 15; --quick 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DATA / "wiki.train.txt")
    p.add_argument("--test", type=Path, default=DATA / "wiki.test.txt")
    p.add_argument("--eval-tokens", type=int, default=None, help="wiki.test tokens scored (default 16384)")
    p.add_argument("--calib-samples", type=int, default=32, help="windows of 256 tokens for the plan")
    p.add_argument("--samples", type=int, default=None, help="training windows (default: what the budget uses)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compressor-bench-heal",
                   help="plan, checkpoints, teacher cache and report (reused by the next run)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 minute of healing, 4096 eval tokens")
    p.add_argument("--child", choices=["plain", "heal"], help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 15.0)
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 16384)
    # About what the budget trains on at ~2 s per step of 4 windows on 2 cores; later epochs reuse the
    # teacher cache instead of running the teacher again.
    args.samples = args.samples or max(64, int(args.minutes * 30))
    return args


def make_or_read_plan(model, windows, args, work: Path):
    """The default plan (compressor.select.plan_blocks, strategy auto), cached in the work directory."""
    from compressor.surgery.plan import read_plan, write_plan

    path = work / f"plan-{args.strategy}-{args.drop}.json"
    if path.is_file():
        return read_plan(path), f"{args.strategy} (cached {path.name})"
    from compressor.calibrate import profile_for
    from compressor.select import get_strategy, plan_blocks

    start = time.perf_counter()
    profile = profile_for(model, windows) if get_strategy(args.strategy).needs_profile else None
    plan = plan_blocks(model, windows, args.drop, args.strategy, profile=profile)[args.drop]
    write_plan(plan, path)
    return plan, f"{args.strategy} ({time.perf_counter() - start:.0f} s to plan)"


def ppl_of(perplexity, model, ids) -> float:
    return perplexity(model, ids, max_length=512, stride=256).perplexity


def run_child(args, kind: str, work: Path, extra=()) -> dict:
    cmd = [sys.executable, str(HERE), "--child", kind, "--work", str(work), "--minutes", str(args.minutes),
           "--threads", str(args.threads), "--data", str(args.data), "--samples", str(args.samples), *extra]
    print(f"- {kind}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {kind} child failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.strip().splitlines()[-1])
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "result": result}  # Linux: ru_maxrss in KiB


def child(args) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    work = args.work
    if args.child == "plain":
        print(json.dumps(plain_training_step(work / "pruned")))
        return
    from compressor.heal.run import heal_checkpoint

    result = heal_checkpoint(work / "pruned", args.teacher, work / "healed", data=args.data,
                             samples=args.samples, eval_samples=0, teacher_cache=work / "teacher-cache",
                             steps=100_000, max_minutes=args.minutes, overwrite=True, log_every=5, **HEAL)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"} | {
        "last_log": result.history[-1] if result.history else None}))


def plain_training_step(checkpoint: Path) -> dict:
    """Two AdamW steps on every parameter with the LM loss, the healing batch: the memory reference."""
    from compressor.heal import lm_loss
    from compressor.loading import load_model

    model, _ = load_model(checkpoint, with_tokenizer=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (HEAL["batch_size"], HEAL["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(2):
        lm_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds_per_step": (time.perf_counter() - start) / 2}


def print_report(r: dict) -> None:
    p = r["perplexity"]
    print(f"\nSmolLM2-135M, {len(r['plan']['drop'])} of 30 blocks removed by plan {r['plan']['how']}: "
          f"{r['plan']['drop']}, linearized {r['plan']['linearize']}")
    print(f"perplexity on wiki.test ({r['eval_tokens']} tokens, 512/256 strided):")
    print(f"  original {p['original']:.2f}   pruned {p['pruned']:.2f}   healed {p['healed']:.2f}")
    frac = r["recovered_fraction"]
    print(f"  recovered {frac:.0%} of the increase -> goal (>= 50%): "
          f"{'MET' if r['goal_half_recovered'] else 'NOT MET'}" if frac is not None else "  pruning cost nothing")
    h = r["heal"]
    print(f"healing: {h['steps']} steps, {h['tokens']} tokens in {h['seconds'] / 60:.1f} min "
          f"({h['tokens_per_second']:.0f} tokens/s), {h['trainable_parameters']} trained parameters, "
          f"stopped by {h['stopped_by']}; load average {r['machine']['load_average_during_healing']} on "
          f"{r['machine']['cpus']} CPUs")
    m = r["peak_rss_mb"]
    print(f"peak RSS: healing {m['healing']:.0f} MB vs the plain training step {m['plain_training_step']:.0f} MB "
          f"= {r['memory_ratio']:.2f}x -> goal (< 2.5x): {'MET' if r['goal_memory_below_2.5x'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
