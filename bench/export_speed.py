"""compress export vs onnxruntime-genai's model builder, side by side in one run (issue 14's goals).

Workload: prefill P tokens, then N greedy tokens, batch 1, through onnxruntime-genai's generator
loop (the same client for every folder). Perplexity: the first T tokens of a text, strided
512/256, by an ONNX Runtime loop (compressor's OrtCausalLM). Models: the builder run directly
(fp32, int8, int4) and `compressor.export.export_model` (fp32 through torch.onnx for reference,
fp32/int8/int4 through the default route). Run it alone on the machine:

    flock -x /tmp/cpu.lock .venv/bin/python bench/export_speed.py --data /work/shared/data/wiki.test.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(checkpoint: Path, out: Path, precision: str) -> float:
    """The builder exactly as a user runs it; returns its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def ours(model, tokenizer, out: Path, precision: str, route: str) -> dict:
    from compressor.export import export_model

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    # fp32 validation is the test suite's job; quantized exports report their quality numbers
    summary = export_model(model, tokenizer, out, precision=precision, route=route, validate=precision != "fp32")
    info = {"export_s": time.perf_counter() - start, "route": summary.route}
    if summary.quantization:
        q = summary.quantization
        info["quantize_s"] = q["seconds"] + q.get("calibration_seconds", 0.0)
        info["algorithm"], info["counts"] = q["algorithm"], q["counts"]
    if summary.validation and summary.validation.get("kind") == "quantized":
        info["validation"] = summary.validation["summary"]
    return info


def set_threads(folder: Path, threads: int) -> None:
    """genai reads the session options from genai_config.json."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    path.write_text(json.dumps(config, indent=2))


def workload(folder: Path, prompt: np.ndarray, new_tokens: int, reps: int) -> dict:
    """Median prefill ms, decode ms/token and total ms over `reps` runs after one warm-up."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    runs = []
    for rep in range(reps + 1):
        params = og.GeneratorParams(model)
        # min_length: EOS must not end a run early, every run decodes exactly new_tokens
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                                  do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        t1 = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        t2 = time.perf_counter()
        made = len(generator.get_sequence(0)) - len(prompt)
        if rep:
            assert made == new_tokens, f"{folder.name}: {made} tokens instead of {new_tokens}"
            runs.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3 / made, (t2 - t0) * 1e3))
        del generator
    del model
    prefill, decode, total = (statistics.median(r[i] for r in runs) for i in range(3))
    return {"prefill_ms": prefill, "decode_ms": decode, "workload_ms": total}


def perplexity(folder: Path, ids, threads: int, window: int = 512) -> float:
    from compressor.evaluate import perplexity as ppl
    from compressor.export import OrtCausalLM

    runner = OrtCausalLM(folder, threads=threads)
    return ppl(runner, ids, max_length=window, stride=window // 2).perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path("/work/shared/data/wiki.test.txt"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=int, default=512, help="perplexity window (stride: half of it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "export-speed")
    args = p.parse_args()

    import torch

    from compressor.loading import load_model, resolve

    torch.set_num_threads(args.threads)
    checkpoint = Path(resolve(args.model))
    model, tokenizer = load_model(args.model, dtype="float32")
    ids = torch.as_tensor(tokenizer(args.data.read_text())["input_ids"][: args.tokens])
    prompt = ids[: args.prefill].numpy().astype(np.int32)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for precision in ("fp32", "int8", "int4"):
        folder = args.work / f"builder-{precision}"
        rows[f"builder {precision}"] = {"folder": folder, "export_s": build(checkpoint, folder, precision)}
    for precision, route in (("fp32", "dynamo"), ("fp32", "auto"), ("int8", "auto"), ("int4", "auto")):
        folder = args.work / f"ours-{precision}-{route}"
        rows[f"ours {precision} ({route})"] = {"folder": folder, **ours(model, tokenizer, folder, precision, route)}
    for name, row in rows.items():
        set_threads(row["folder"], args.threads)
        row.update(workload(row["folder"], prompt, args.new, args.reps))
        row["ppl"] = perplexity(row["folder"], ids, args.threads, args.window)
        print(f"measured {name}: {row['workload_ms']:.0f} ms, ppl {row['ppl']:.3f}", file=sys.stderr, flush=True)
    (args.work / "results.json").write_text(json.dumps({k: {**v, "folder": str(v["folder"])} for k, v in rows.items()},
                                                       indent=1))
    report(rows, args)


def report(rows: dict, args) -> None:
    base = rows["ours fp32 (dynamo)"]
    ref = rows["builder fp32"]["ppl"]
    print(f"\nSmolLM2 export speed: prefill {args.prefill} + {args.new} greedy tokens, batch 1, onnxruntime-genai "
          f"generator, {args.threads} threads, median of {args.reps}; perplexity: first {args.tokens} tokens of "
          f"{args.data.name}, {args.window}/{args.window // 2}\n")
    print(f"{'model':<22}{'route':>8}{'workload ms':>13}{'prefill ms':>12}{'decode ms/t':>13}{'vs dynamo':>11}"
          f"{'ppl':>9}{'Δppl vs fp32':>14}{'export s':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r.get('route', '-'):>8}{r['workload_ms']:>13.0f}{r['prefill_ms']:>12.0f}{r['decode_ms']:>13.2f}"
              f"{base['workload_ms'] / r['workload_ms']:>10.2f}x{r['ppl']:>9.3f}{100 * (r['ppl'] / ref - 1):>+13.2f}%"
              f"{r['export_s']:>10.1f}")
    for name, r in rows.items():
        if "quantize_s" in r:
            print(f"{name}: {r['algorithm']} {r['counts']}, quantization {r['quantize_s']:.1f} s (calibration "
                  f"included), whole export {r['export_s']:.1f} s; validation: {r['validation']}")
    print("\nGoals (ratio = ours / builder, lower is faster):")
    goals = [
        ("fp32 workload / builder fp32 <= 1.00", rows["ours fp32 (auto)"]["workload_ms"] / rows["builder fp32"]["workload_ms"], 1.0),
        ("fp32 decode/token / builder fp32 <= 1.00", rows["ours fp32 (auto)"]["decode_ms"] / rows["builder fp32"]["decode_ms"], 1.0),
        ("int8 workload / builder int8 <= 1.00", rows["ours int8 (auto)"]["workload_ms"] / rows["builder int8"]["workload_ms"], 1.0),
        ("int8 ppl increase over fp32 <= 1%", 100 * (rows["ours int8 (auto)"]["ppl"] / ref - 1), 1.0),
        ("int4 workload / builder int4 <= 1.00", rows["ours int4 (auto)"]["workload_ms"] / rows["builder int4"]["workload_ms"], 1.0),
        ("int4 ppl increase <= half the builder's (%)", 100 * (rows["ours int4 (auto)"]["ppl"] / ref - 1),
         50 * (rows["builder int4"]["ppl"] / ref - 1)),
        ("int4 quantization s (calibration included) < 180", rows["ours int4 (auto)"].get("quantize_s", float("nan")), 180.0),
    ]
    for text, value, bound in goals:
        print(f"  {text:<50} {value:8.3f}  (bound {bound:.3f})  {'met' if value <= bound else 'NOT met'}")


if __name__ == "__main__":
    main()
