"""Healing recipes side by side, in one run: what each recovers in the same minutes, on text held out
from training and on text from another source.

SmolLM2-135M with the default plan's 6 of 30 blocks removed (bench/heal.py makes the plan and caches it
in the work directory). Every recipe heals the same pruned checkpoint on `--data` (wiki.train.txt) for
`--minutes` through `compress heal`'s own function (compressor.heal.run.heal_checkpoint), in a child
process of its own, with a teacher cache of its own (built inside the budget, as a first run builds
it), and is then scored on two texts:

- in-domain: `--test` (wiki.test.txt, held out from training);
- other source: the prose of Python's documentation (`compressor.data.python_docs_texts`).

"Recovered" is (pruned - healed) / (pruned - original) perplexity, per text.

    python bench/heal_recipes.py                          # every recipe, 4 minutes each
    python bench/heal_recipes.py --minutes 12 --recipes touched,all+every
    python bench/heal_recipes.py --list                   # the recipes and their settings

Run nothing else on the machine meanwhile: the budget is wall time, so a busy machine buys fewer steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from heal import DATA, HEAL, make_or_read_plan, ppl_of  # bench/heal.py: the plan and the base recipe

# Each recipe: changes to BASE, bench/heal.py's HEAL settings (compress heal's defaults of the first runs but for lr
# and warmup: alpha 0.8, where compress heal now takes 0.5, "touched+local0.5+alpha0.5") with no local reconstruction.
BASE = {**HEAL, "local": 0.0}
RECIPES = {
    "touched": {},
    "all": {"train": "all", "lr": 2e-4},
    "lora": {"train": "lora", "lr": 1e-3},
    "norms": {"train": "norms", "lr": 3e-3},
    "touched+every": {"hidden_weight": 1.0, "hidden_at": "every"},
    "all+every": {"train": "all", "lr": 2e-4, "hidden_weight": 1.0, "hidden_at": "every"},
    "touched+live": {"teacher_cache": "off"},  # the teacher on every batch: full KD, no window reused
    "touched+T2": {"temperature": 2.0},
    "touched+seq128": {"seq_len": 128, "batch_size": 8},  # the same tokens a step, twice the windows
    "touched+lr3e-3": {"lr": 3e-3},
    "all+lr5e-4": {"train": "all", "lr": 5e-4},
    "touched+local0.5": {"local": 0.5},  # half the time on the touched blocks alone (compressor.heal.local)
    "touched+local0.8": {"local": 0.8},
    "touched+local0.5+lr3e-3": {"local": 0.5, "lr": 3e-3},
    "touched+local0.5+reach2": {"local": 0.5, "reach": 2},  # 2 kept blocks on each side of a cut
    "touched+local0.5+reach3": {"local": 0.5, "reach": 3},
    "touched+local0.7": {"local": 0.7},
    "touched+local0.5+kd": {"local": 0.5, "alpha": 1.0},  # distillation on the teacher's distribution alone
    "touched+local0.5+live": {"local": 0.5, "teacher_cache": "off"},  # local's own targets pass, live KD
    "touched+local0.5+alpha0.5": {"local": 0.5, "alpha": 0.5},  # more weight on the next-token loss
    "touched+local0.5+alpha0.3": {"local": 0.5, "alpha": 0.3},
    "touched+local0.5+alpha0.2": {"local": 0.5, "alpha": 0.2},
    "touched+local0.5+alpha0.5+live": {"local": 0.5, "alpha": 0.5, "teacher_cache": "off"},  # compress model's until now
    # twice the training windows (60 of 256 tokens a minute): the teacher's pass stops at its share of the time
    "touched+local0.5+alpha0.5+win60": {"local": 0.5, "alpha": 0.5, "windows_per_minute": 60},
    # compress heal's own default draw (--samples 512), whatever the minutes
    "touched+local0.5+alpha0.5+samples512": {"local": 0.5, "alpha": 0.5, "samples": 512},
}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.list:
        for name, change in RECIPES.items():
            print(f"{name:16s} {json.dumps({**BASE, **change})}")
        return
    if args.child:
        return child(args)
    from compressor.data import load_texts, make_windows
    from compressor.loading import load_model, resolve
    from compressor.surgery.edit import save_checkpoint
    from compressor.surgery.plan import apply_plan_

    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(RECIPES)}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    original, tokenizer = load_model(args.model)
    calib = make_windows(tokenizer, load_texts(args.data), 32, 256, seed=1)
    args.drop, args.strategy = 6, "auto"
    plan, how = make_or_read_plan(original, calib, args, work)
    pruned = copy.deepcopy(original)
    apply_plan_(pruned, plan)
    save_checkpoint(pruned, tokenizer, work / "pruned")
    texts = eval_texts(tokenizer, args)
    ppl = {"original": score(original, texts), "pruned": score(pruned, texts)}
    del original, pruned
    print(f"plan {how}: drop {plan.drop}, linearize {plan.linearize}", flush=True)
    print(f"original {fmt(ppl['original'])}   pruned {fmt(ppl['pruned'])}", flush=True)
    teacher = str(resolve(args.model))
    report = {"model": args.model, "plan": {"how": how, "drop": plan.drop, "linearize": plan.linearize},
              "minutes": args.minutes, "threads": args.threads, "data": str(args.data),
              "eval_tokens": {t: int(ids.numel()) for t, ids in texts.items()}, "perplexity": ppl,
              "base": BASE, "recipes": [], "machine": {"cpus": os.cpu_count()}}
    out = args.out or work / f"heal-recipes-{args.minutes:g}min.json"
    for name in names:
        start = time.perf_counter()
        result = run_child(args, name, teacher)
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        result["load_average"] = os.getloadavg()[0]  # other work on the machine buys a recipe fewer steps
        result["recovered"] = {t: recovered(ppl, result["perplexity"][t], t) for t in texts}
        report["recipes"].append(result)
        print(row_line(result), flush=True)
        out.write_text(json.dumps(report, indent=2))  # after every recipe: a long run stopped early keeps its rows
    print_table(report)
    print(f"\nfull report: {out}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", help=f"comma-separated, from: {', '.join(RECIPES)} (default: all)")
    p.add_argument("--minutes", type=float, default=4.0, help="healing budget of each recipe (default 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DATA / "wiki.train.txt")
    p.add_argument("--test", type=Path, default=DATA / "wiki.test.txt")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens scored of each text")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compressor-bench-heal",
                   help="the plan (shared with bench/heal.py), the pruned checkpoint, each recipe's run")
    p.add_argument("--out", type=Path, help="the JSON report (default: in --work)")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    return p.parse_args()


def eval_texts(tokenizer, args) -> dict[str, torch.Tensor]:
    """Token ids of the in-domain test text and of the other source, `--eval-tokens` of each."""
    from compressor.data import python_docs_texts
    from compressor.evaluate import load_eval_tokens

    text = "\n\n".join(python_docs_texts())[:16 * args.eval_tokens]  # ample: about 4 characters a token
    docs = tokenizer(text)["input_ids"][:args.eval_tokens]
    return {"in_domain": load_eval_tokens(tokenizer, args.test, max_tokens=args.eval_tokens),
            "other_source": torch.tensor(docs, dtype=torch.long)}


def score(model, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    from compressor.evaluate import perplexity

    return {t: ppl_of(perplexity, model, ids) for t, ids in texts.items()}


def recovered(ppl: dict, healed: float, text: str) -> float | None:
    lost = ppl["pruned"][text] - ppl["original"][text]
    return (ppl["pruned"][text] - healed) / lost if lost > 0 else None


def run_child(args, name: str, teacher: str) -> dict:
    cmd = [sys.executable, str(HERE), "--child", name, "--work", str(args.work), "--minutes", str(args.minutes),
           "--threads", str(args.threads), "--data", str(args.data), "--test", str(args.test),
           "--eval-tokens", str(args.eval_tokens), "--teacher", teacher]
    print(f"- {name}: {json.dumps({**BASE, **RECIPES[name]})}", flush=True)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"recipe {name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args) -> None:
    """Heal the pruned checkpoint with one recipe, score the result, print one JSON line."""
    import logging

    from compressor.heal.run import heal_checkpoint
    from compressor.loading import load_model

    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    settings = {**BASE, **RECIPES[args.child]}
    run_dir = args.work / "recipes" / args.child.replace("+", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    cache = settings.pop("teacher_cache", run_dir / "teacher-cache")
    per_minute = settings.pop("windows_per_minute", 30)  # bench/heal.py's tokens per minute: 30 windows of 256
    samples = settings.pop("samples", max(64, int(args.minutes * per_minute * 256 / settings["seq_len"])))
    result = heal_checkpoint(args.work / "pruned", args.teacher, run_dir / "healed", data=args.data,
                             samples=samples, eval_samples=0, teacher_cache=cache, steps=100_000,
                             max_minutes=args.minutes, overwrite=True, log_every=10, **settings)
    healed, tokenizer = load_model(run_dir / "healed")
    ppl = score(healed, eval_texts(tokenizer, args))
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({"recipe": args.child, "settings": settings, "samples": samples, "perplexity": ppl,
                      **{k: getattr(result, k) for k in ("steps", "tokens", "seconds", "trainable_parameters",
                                                          "stopped_by", "loss_first", "loss_last", "local")}}))


def fmt(ppl: dict) -> str:
    return f"in-domain {ppl['in_domain']:.2f}, other source {ppl['other_source']:.2f}"


def row_line(r: dict) -> str:
    rec = r["recovered"]
    return (f"  {r['recipe']}: {fmt(r['perplexity'])}; recovered {rec['in_domain']:.0%} / {rec['other_source']:.0%}; "
            f"{r['steps']} steps, {r['tokens']} tokens, {r['seconds'] / 60:.1f} min")


def print_table(r: dict) -> None:
    p = r["perplexity"]
    print(f"\nSmolLM2-135M, blocks {r['plan']['drop']} removed; {r['minutes']:g} min of healing each on "
          f"{Path(r['data']).name}, {r['threads']} threads; perplexity on {r['eval_tokens']['in_domain']} tokens "
          f"of each text (512/256 strided)")
    print(f"original: {fmt(p['original'])}; pruned: {fmt(p['pruned'])}\n")
    print("| recipe | trained parameters | steps | tokens | in-domain | recovered | other source | recovered |")
    print("|---|---|---|---|---|---|---|---|")
    for x in r["recipes"]:
        q, rec = x["perplexity"], x["recovered"]
        print(f"| {x['recipe']} | {x['trainable_parameters']:,} | {x['steps']} | {x['tokens']:,} | "
              f"{q['in_domain']:.2f} | {rec['in_domain']:.0%} | {q['other_source']:.2f} | {rec['other_source']:.0%} |")


if __name__ == "__main__":
    main()
