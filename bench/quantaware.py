"""int4 export of the unpruned SmolLM2 without healing against after quantization-aware healing, in one run.

Rows (every perplexity from the same ORT loop as bench/int4.py: the first --tokens tokens of --test,
strided 512/256):
- fp32: `export_model(..., precision="fp32")`, the reference;
- int4 default: `compress export --precision int4` as it ships (GPTQ calibrated on --data, 8-bit MatMuls
  by measured sensitivity);
- int4 round to nearest: the same with --quant-algorithm rtn (where quantization-aware healing starts);
- int4 after QAT: `compress heal --quantization-aware int4 --train all --max-minutes M` (the function
  behind it, heal_checkpoint; teacher = the fp32 model, live), then `compress export --precision int4`,
  which rounds to nearest on the trained grid (the record in config.json).

    python bench/quantaware.py                          # 9.5 minutes of healing on 2 CPU cores (lr 2e-4)
    python bench/quantaware.py --minutes 4 --lr 1e-4,2e-4   # a row per learning rate
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
DATA = HERE.parents[1].parent / "shared" / "data"


def export(model, tokenizer, out: Path, precision: str, data: Path, **quant) -> dict:
    from compressor.export.run import export_model, quant_options

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = quant_options(precision, **quant)[0] if quant else None
    start = time.perf_counter()
    summary = export_model(model, tokenizer, out, precision=precision, validate=False, data=data, quant=config)
    q = summary.quantization or {}
    return {"export_s": round(time.perf_counter() - start, 1), "algorithm": q.get("algorithm", "-"),
            "bits": q.get("counts", {}), "notes": q.get("notes", [])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=DATA / "wiki.train.txt", help="healing and calibration text")
    p.add_argument("--test", type=Path, default=DATA / "wiki.test.txt")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--minutes", type=float, default=9.5,
                   help="quantization-aware healing budget (--max-minutes: loading, evaluation and training)")
    p.add_argument("--lr", default="2e-4", help="peak learning rate(s), comma-separated: one QAT row each "
                   "(2e-4, heal's --train all default, beat 1e-4 in one run)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/compressor-bench-quantaware"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE.parent))
    from int4 import perplexity  # bench/int4.py's ORT loop: the same numbers as its table

    from compressor.heal.run import heal_checkpoint
    from compressor.loading import load_model, resolve

    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, dtype="float32")
    ids = np.asarray(tokenizer(args.test.read_text())["input_ids"][: args.tokens], dtype=np.int64)
    rows: dict[str, dict] = {}

    def measure(name: str, folder: Path, info: dict) -> None:
        rows[name] = {"ppl": perplexity(folder, ids, args.threads), **info}
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)

    measure("fp32", args.work / "fp32", export(model, tokenizer, args.work / "fp32", "fp32", args.data))
    measure("int4 default (GPTQ)", args.work / "int4",
            export(model, tokenizer, args.work / "int4", "int4", args.data))
    measure("int4 round to nearest", args.work / "int4-rtn",
            export(model, tokenizer, args.work / "int4-rtn", "int4", args.data, algorithm="rtn"))

    src = resolve(args.model)
    runs = {}
    for lr in [float(x) for x in args.lr.split(",")]:
        start = time.perf_counter()
        healed = heal_checkpoint(src, src, args.work / "qat", data=args.data, seq_len=args.seq_len, samples=1024,
                                 eval_samples=8, teacher_cache="off", overwrite=True, steps=100_000,
                                 max_minutes=args.minutes, lr=lr, warmup=args.warmup, train="all",
                                 batch_size=args.batch_size, quantization_aware="int4")
        heal_s = time.perf_counter() - start
        qat_model, _ = load_model(args.work / "qat", dtype="float32")
        info = export(qat_model, tokenizer, args.work / "int4-qat", "int4", args.data)
        info.update(heal_s=round(heal_s, 1), steps=healed.steps, fake_quant_ppl=[healed.ppl_before, healed.ppl_after])
        name = f"int4 after QAT, lr {lr:g}"
        measure(name, args.work / "int4-qat", info)
        runs[name] = info
        del qat_model

    base = rows["fp32"]["ppl"]
    print(f"SmolLM2 ({args.model}), unpruned; perplexity on {len(ids)} tokens of {args.test.name} (strided 512/256, "
          f"one ORT loop), {args.threads} threads; QAT: heal --quantization-aware int4 --train all --max-minutes "
          f"{args.minutes:g} --batch-size {args.batch_size} --seq-len {args.seq_len} --warmup {args.warmup} on "
          f"{args.data.name}, live fp32 teacher")
    for name, info in runs.items():
        before, after = info["fake_quant_ppl"]
        print(f"{name}: {info['steps']} steps, {info['heal_s'] / 60:.1f} min wall; held-out fake-quantized "
              f"perplexity (torch, 8 windows of --data's last tenth) {before:.2f} -> {after:.2f}")
    print("| export | perplexity | vs fp32 | 4/8-bit MatMuls | export s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        change = "" if name == "fp32" else f"{100 * (row['ppl'] / base - 1):+.1f}%"
        bits = "/".join(str(row["bits"].get(b, 0)) for b in ("4", "8")) if row["bits"] else "-"
        print(f"| {name} | {row['ppl']:.2f} | {change} | {bits} | {row['export_s']} |")


if __name__ == "__main__":
    main()
