"""Soak test: interrupt `compress model` at random moments and check that no work is lost or corrupted.

    python bench/soak.py                       # 20 SIGKILLs and 10 SIGINTs on a tiny model
    python bench/soak.py --kills 3 --ints 2    # a short run (tests/test_soak.py, marked slow)

First one uninterrupted run gives the reference. Then each trial starts the same command into its
own --out, sends SIGKILL (or SIGINT) after a random delay within the reference run's duration, and
checks that
- --out is either absent or complete (every file a finished run delivers, report.json readable),
  never partial;
- the rerun of the same command finishes (exit 0) and resumes what was done, when a stage was done;
- its plan, perplexities and blocks equal the reference run's exactly.
The run uses a perplexity budget, so no timing decides the plan. Prints one line per trial and a summary;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# SIGINT reset in the child: a background job of a non-interactive shell inherits it as ignored.
LAUNCH = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "import sys; sys.argv[0] = 'compress'; from compressor.cli import main; main()\n")
SETTINGS = ["--max-ppl-increase", "30%", "--workload", "1x32+8", "--samples", "8", "--seq-len", "32",
            "--heal-steps", "20", "--backend", "torch", "--threads", "1", "--min-seconds", "0.1", "--format", "none"]
DELIVERED = ["report.json", "report.md", "report.html", "profile.json", "plan.json", "model/config.json"]


def command(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", LAUNCH, "model", str(model), "--out", str(out), *SETTINGS]


def outcome(out: Path) -> dict:
    """What a comparison needs from a finished run: the plan, the perplexities, the blocks."""
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return {"drop": plan["drop"], "linearize": plan["linearize"], "blocks_removed": report["blocks_removed"],
            "perplexity": report["perplexity"]}


def state_of(out: Path) -> str:
    if not out.exists():
        return "absent"
    missing = [f for f in DELIVERED if not (out / f).is_file()]
    if missing:
        return f"PARTIAL (missing {', '.join(missing)})"
    try:
        json.loads((out / "report.json").read_text())
    except ValueError:
        return "PARTIAL (report.json unreadable)"
    return "complete"


def trial(model: Path, root: Path, sig: signal.Signals, delay: float, reference: dict) -> tuple[bool, str]:
    out = root / f"run-{sig.name}-{delay:.2f}"
    process = subprocess.Popen(command(model, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        finished_first = process.poll() is not None
        if not finished_first:
            process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    state = state_of(out)
    work = out.parent / f".{out.name}.work"
    stages = sorted(p.name.removesuffix(".stage.json") for p in work.glob("*.stage.json")) if work.exists() else []
    problems = []
    if state.startswith("PARTIAL"):
        problems.append(state)
    if sig == signal.SIGINT and not finished_first and process.returncode != 130:
        problems.append(f"SIGINT gave exit {process.returncode}: {stderr.strip()[-300:]}")
    if state == "complete":
        rerun_note = "finished before the signal"
    else:
        again = subprocess.run(command(model, out), capture_output=True, text=True, timeout=600, check=False)
        if again.returncode != 0:
            problems.append(f"rerun exit {again.returncode}: {again.stderr.strip()[-300:]}")
        elif stages and "resuming" not in again.stderr:
            problems.append(f"rerun did not resume (stages done: {', '.join(stages)})")
        rerun_note = f"rerun resumed {', '.join(stages) or 'nothing (none done)'}"
    if not problems and outcome(out) != reference:
        problems.append(f"result differs from the uninterrupted run: {outcome(out)} vs {reference}")
    shutil.rmtree(out, ignore_errors=True)
    ok = not problems
    return ok, f"{sig.name:7s} after {delay:5.2f} s: --out {state}; {rerun_note}" + ("" if ok else
                                                                                     f"; FAILED: {problems}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--ints", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from conftest import make_tokenizer, tiny_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="compressor-soak-") as tmp:
        root = Path(tmp)
        model = root / "tiny-llama"
        tiny_model("llama").save_pretrained(model)
        make_tokenizer().save_pretrained(model)
        start = time.perf_counter()
        done = subprocess.run(command(model, root / "reference"), capture_output=True, text=True, timeout=600,
                              check=False)
        duration = time.perf_counter() - start
        if done.returncode != 0:
            print(f"the uninterrupted run failed (exit {done.returncode}): {done.stderr[-1000:]}")
            return 1
        reference = outcome(root / "reference")
        print(f"uninterrupted run: {duration:.1f} s, removed {reference['blocks_removed']}")
        signals = [signal.SIGKILL] * args.kills + [signal.SIGINT] * args.ints
        rng.shuffle(signals)
        results = []
        for sig in signals:
            ok, line = trial(model, root, sig, rng.uniform(0.5, duration), reference)
            results.append(ok)
            print(line, flush=True)
    print(f"{sum(results)} of {len(results)} interruptions survived ({args.kills} SIGKILL, {args.ints} SIGINT): "
          "--out absent or complete, rerun finished with the uninterrupted run's plan and perplexities")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
