"""Weight-only quantization side by side: builder fp32/int8/int4 against compressor.quantize candidates.

For each model folder: perplexity (first --tokens tokens of --data, strided 512/256, a plain ORT
loop) and, with --latency, the workload (prefill 512 + 128 greedy tokens, batch 1, --threads
threads, onnxruntime-genai's generator). Candidates are quantized from the builder's fp32 graph
with calibration windows from compressor's bundled calibration text (not the evaluation text).

    flock -x /tmp/cpu.lock .venv/bin/python bench/quantize.py --latency
    flock -s /tmp/cpu.lock .venv/bin/python bench/quantize.py --candidates rtn4,gptq4-head8
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from int4 import perplexity, workload  # bench/int4.py's plain ORT loop (this folder is on sys.path when run)

from compressor.data import load_texts, make_windows
from compressor.loading import resolve
from compressor.quantize import QuantConfig, measure_hessians, quantize_onnx

# name -> QuantConfig fields
CANDIDATES = {
    "rtn8": {"bits": 8, "algorithm": "rtn"},
    "rtn4": {"bits": 4, "algorithm": "rtn", "keep_int8": "none"},
    "rtn4-head8": {"bits": 4, "algorithm": "rtn", "keep_int8": "lm_head"},
    "gptq4": {"bits": 4, "algorithm": "gptq", "keep_int8": "none"},
    "gptq4-head8": {"bits": 4, "algorithm": "gptq", "keep_int8": "lm_head"},
    "gptq4-asym-head8": {"bits": 4, "algorithm": "gptq", "keep_int8": "lm_head", "grid": "asymmetric"},
    "gptq8": {"bits": 8, "algorithm": "gptq"},
    "mse4": {"bits": 4, "algorithm": "mse", "keep_int8": "none"},
    "mse4-head8": {"bits": 4, "algorithm": "mse", "keep_int8": "lm_head"},
    "mse8": {"bits": 8, "algorithm": "mse"},
    "auto4": {"bits": 4},
    "auto8": {"bits": 8},
}


def build(ckpt: Path, out: Path, precision: str) -> Path:
    if not (out / "model.onnx").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(out) + ".cache"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def candidate(name: str, fp32: Path, work: Path, windows) -> tuple[Path, dict]:
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    config = QuantConfig(**CANDIDATES[name])
    summary = quantize_onnx(fp32 / "model.onnx", out / "model.onnx", config, calibration=windows)
    return out, {"seconds": round(summary.seconds, 1), "calibration_seconds": round(summary.calibration_seconds, 1),
                 "int8_nodes": len(summary.int8_nodes), "mb": round(summary.bytes_after / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("/work/shared/data/wiki.test.txt"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--work", type=Path, default=Path("/tmp/compressor-bench-quantize"))
    p.add_argument("--builder", default="fp32,int8,int4", help="builder precisions to include")
    p.add_argument("--candidates", default="rtn8,rtn4,auto4")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq", type=int, default=256)
    p.add_argument("--skip-first", type=int, default=0, help="window positions left out of the Hessians")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="also time the workload (run under flock -x)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from transformers import AutoTokenizer

    ckpt = Path(resolve(args.model))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = np.asarray(tok(args.data.read_text())["input_ids"][: args.tokens], dtype=np.int64)
    args.work.mkdir(parents=True, exist_ok=True)
    folders, info = {}, {}
    for prec in [s for s in args.builder.split(",") if s] or []:
        folders[f"builder-{prec}"] = build(ckpt, args.work / f"builder-{prec}", prec)
    fp32 = build(ckpt, args.work / "builder-fp32", "fp32")
    windows = make_windows(tok, load_texts(None), args.calib_samples, args.calib_seq, seed=0)
    t0 = time.perf_counter()
    full = any(CANDIDATES[c].get("algorithm") == "gptq" for c in args.candidates.split(",") if c)
    hessians = measure_hessians(fp32 / "model.onnx", windows, skip_first=args.skip_first, full=full)
    print(f"calibration: {hessians.tokens} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in [s for s in args.candidates.split(",") if s]:
        folders[name], info[name] = candidate(name, fp32, args.work, hessians)
        print(name, info[name], flush=True)
    base = perplexity(fp32, ids, args.threads)
    rows = []
    for name, folder in folders.items():
        ppl = base if name == "builder-fp32" else perplexity(folder, ids, args.threads)
        row = {"model": name, "ppl": round(ppl, 3), "ppl_increase_pct": round(100 * (ppl / base - 1), 2), **info.get(name, {})}
        if args.latency:
            row.update({k: round(v, 1) for k, v in workload(folder, ids[:512], 128, args.threads, args.repeats).items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = {r["model"]: r for r in rows}
    print(f"\nperplexity on {args.tokens} tokens of {args.data.name}; calibration {args.calib_samples}x{args.calib_seq} "
          f"tokens of the bundled text; threads={args.threads}")
    for r in rows:
        line = f"{r['model']:>18}: ppl {r['ppl']:.3f} ({r['ppl_increase_pct']:+.2f}%)"
        if "workload_ms" in r:
            line += f"  workload {r['workload_ms']:.0f} ms (prefill {r['prefill_ms']:.0f}, decode {r['decode_ms_per_token']:.1f}/tok)"
            for b in ("builder-int8", "builder-int4"):
                if b in ref and "workload_ms" in ref[b] and r["model"] != b:
                    line += f"  /{b} {r['workload_ms'] / ref[b]['workload_ms']:.3f}"
        if "seconds" in r:
            line += f"  quantized in {r['seconds']:.0f} s (calibration {r['calibration_seconds']:.0f} s)"
        print(line)
    b4 = ref.get("builder-int4")
    if b4:
        for r in rows:
            if r["model"] not in ("builder-int4",) and r["ppl_increase_pct"] > 0:
                print(f"  {r['model']}: ppl increase / builder int4's = {r['ppl_increase_pct'] / b4['ppl_increase_pct']:.2f}")


if __name__ == "__main__":
    main()
