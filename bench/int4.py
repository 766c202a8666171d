"""int8/int4 side by side: onnxruntime-genai's builder against `compress export`, in one run.

Folders: builder fp32, int8, int4 (default RTN) and int4 `--extra_options algo_config=k_quant_mixed`;
ours: `export_model(..., precision="int8"|"int4")` (what `compress export --precision` runs, calibrated
on the bundled text unless --data). For each: perplexity from one independent ORT loop (first --tokens
tokens of --eval, strided 512/256, the same loop for every folder), the change against builder fp32,
the folder's size (every file, tokenizer included; MB = 10^6 bytes) and, with --latency, the workload
(prompt 512 + 128 greedy tokens, batch 1, --threads threads, onnxruntime-genai's generator), best of
--repeats per round over --rounds alternating rounds, printed with the spread across rounds.

--int4 '{"act_order": false}' measures our int4 row with QuantConfig fields changed; --hqq adds ONNX
Runtime's own HQQ quantizer (`matmul_nbits_quantizer`, training-free, every MatMul 4-bit, float zero
points) on the builder's fp32 graph. (Its k-quant config needs Intel Neural Compressor, which is not
installed; the builder's k_quant_mixed row is the same algorithm.)

    .venv/bin/python bench/int4.py                # perplexity and size
    .venv/bin/python bench/int4.py --latency      # and timings (on a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUILDER = {"builder fp32": ["-p", "fp32"], "builder int8": ["-p", "int8"], "builder int4": ["-p", "int4"],
           "builder int4 k_quant_mixed": ["-p", "int4", "--extra_options", "algo_config=k_quant_mixed"]}


def build(ckpt: Path, out: Path, options: list[str]) -> Path:
    if not (out / "model.onnx").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                        "-e", "cpu", "-c", str(out) + ".cache", *options], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def ours(model, tokenizer, out: Path, precision: str, data: Path | None, reuse: bool = False,
         fields: dict | None = None, **quant) -> tuple[Path, dict]:
    import dataclasses
    import shutil

    from compressor.export.run import SUMMARY_FILE, export_model, quant_options

    if reuse and (out / SUMMARY_FILE).is_file():  # a folder this script wrote before: measure it again
        q = json.loads((out / SUMMARY_FILE).read_text())["quantization"]
        return out, {"quantize_s": round(q["seconds"], 1), "calibration_s": round(q["calibration_seconds"], 1),
                     "algorithm": q["algorithm"], "bits": q["counts"], "reused": True}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = quant_options(precision, **quant)[0] if quant or fields else None
    if fields:  # QuantConfig fields that quant_options (the CLI's) does not take
        config = dataclasses.replace(config, **fields)
    q = export_model(model, tokenizer, out, precision=precision, validate=False, data=data, quant=config).quantization
    return out, {"quantize_s": round(q["seconds"], 1), "calibration_s": round(q["calibration_seconds"], 1),
                 "algorithm": q["algorithm"], "bits": q["counts"]}


def hqq(fp32: Path, out: Path, block_size: int = 32) -> tuple[Path, dict]:
    """ONNX Runtime's HQQ (4-bit, every MatMul, block_size along K) on the fp32 graph in `fp32`."""
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if not (out / "model.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), algo_config=HQQWeightOnlyQuantConfig(
            block_size=block_size, bits=4), accuracy_level=4)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out / "model.onnx"), save_as_external_data=True,
                  location="model.onnx.data")
        (out / "quantize_s").write_text(f"{time.perf_counter() - start:.1f}")
        for f in fp32.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy2(f, out / f.name)
    return out, {"quantize_s": float((out / "quantize_s").read_text())}


def _feeds(session, window: np.ndarray, head: int) -> dict:
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = window
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(window)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(window.shape[1], dtype=np.int64)[None]
        else:  # an empty cache: [batch, kv heads, 0, head size]
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, head), dtype=np.float32)
    return feeds


def perplexity(folder: Path, ids: np.ndarray, threads: int, max_length: int = 512, stride: int = 256) -> float:
    """Strided perplexity with a plain ORT session: each token scored once, with up to max_length context."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        logits = session.run(["logits"], _feeds(session, ids[begin:end][None], head))[0][0].astype(np.float64)
        first = max(prev_end, 1) - begin
        logp = logits[first - 1: -1]
        logp = logp - logp.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        targets = ids[begin + first: end]
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll / count))


def workload(folder: Path, prompt: np.ndarray, new_tokens: int, threads: int, repeats: int) -> dict:
    """Best of `repeats` (after one warm-up) prompt + greedy decode in genai's generator: prefill_ms,
    decode_ms_per_token and workload_ms of the fastest run. `threads` is set in genai_config.json."""
    import onnxruntime_genai as og

    _set_threads(folder, threads)
    model = og.Model(str(folder))
    best = None
    for i in range(repeats + 1):
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32)[None])
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t2 = time.perf_counter()
        run = {"prefill_ms": (t1 - t0) * 1e3, "decode_ms_per_token": (t2 - t1) * 1e3 / new_tokens,
               "workload_ms": (t2 - t0) * 1e3}
        if i and (best is None or run["workload_ms"] < best["workload_ms"]):
            best = run
        del gen
    return best


def _set_threads(folder: Path, threads: int) -> None:
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wiki.test.txt")
    p.add_argument("--data", type=Path, default=None, help="calibration text for ours (default: bundled)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--work", type=Path, default=Path("/tmp/compressor-bench-int4"))
    p.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--minmax", action="store_true", help="also ours int4 --grid minmax (float zero points)")
    p.add_argument("--int4", type=json.loads, default=None, help="QuantConfig fields for our int4 row (JSON)")
    p.add_argument("--hqq", action="store_true", help="also ONNX Runtime's HQQ int4 (block 32) on builder fp32")
    p.add_argument("--reuse", action="store_true", help="measure our folders from an earlier run again")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from compressor.loading import load_model, resolve

    ckpt = Path(resolve(args.model))
    model, tokenizer = load_model(args.model, dtype="float32")
    ids = np.asarray(tokenizer(args.eval.read_text())["input_ids"][: args.tokens], dtype=np.int64)
    args.work.mkdir(parents=True, exist_ok=True)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    folders, info = {}, {}
    for name, options in BUILDER.items():
        if not only or name in only or name == "builder fp32":
            folders[name] = build(ckpt, args.work / name.replace(" ", "-"), options)
    for precision in ("int8", "int4"):
        name = f"compress export {precision}"
        if not only or name in only:
            folders[name], info[name] = ours(model, tokenizer, args.work / f"ours-{precision}", precision, args.data,
                                             args.reuse, args.int4 if precision == "int4" else None)
            print(name, json.dumps(info[name]), file=sys.stderr, flush=True)
    if args.minmax:
        name = "compress export int4 --grid minmax"
        folders[name], info[name] = ours(model, tokenizer, args.work / "ours-int4-minmax", "int4", args.data,
                                         args.reuse, grid="minmax", algorithm="mse")
    if args.hqq:
        name = "onnxruntime HQQ int4 (block 32, all MatMuls)"
        folders[name], info[name] = hqq(folders["builder fp32"], args.work / "ort-hqq-int4")
    rows = {}
    for name, folder in folders.items():
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        rows[name] = {"ppl": perplexity(folder, ids, args.threads), "mb": size / 1e6, **info.get(name, {})}
        print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    if args.latency:
        times: dict[str, list[float]] = {n: [] for n in folders}
        for _ in range(args.rounds):  # alternating: drift on a shared machine hits every row alike
            for name, folder in folders.items():
                times[name].append(workload(folder, ids[:512], 128, args.threads, args.repeats)["workload_ms"])
    base = rows["builder fp32"]["ppl"]
    print(f"SmolLM2 ({args.model}), perplexity on {len(ids)} tokens of {args.eval.name} (strided 512/256, one ORT "
          f"loop), {args.threads} threads" + (f", workload best of {args.repeats} x {args.rounds} rounds" if args.latency
                                              else ""))
    print("| folder | workload ms (spread) | perplexity | vs fp32 | size MB | quantize s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        t = times[name] if args.latency else []
        work = f"{min(t):,.0f} ({min(t):,.0f}-{max(t):,.0f})" if t else "-"
        change = "" if name == "builder fp32" else f"{100 * (row['ppl'] / base - 1):+.1f}%"
        print(f"| {name} | {work} | {row['ppl']:.2f} | {change} | {row['mb']:.1f} | {row.get('quantize_s', '-')} |")


if __name__ == "__main__":
    main()
