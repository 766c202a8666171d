"""Calibration cost, side by side on SmolLM2-135M, each variant in a fresh process:

  (a)  plain forward pass over the calibration tokens (the whole model, logits included)
  (a') forward through the decoder blocks only (what any calibration must run at least)
  (b)  compressor's streaming calibration (hooks + float64 Gram statistics + metrics)
  (c)  the paper's notebook way: keep every hidden state, then a float64 least-squares fit per block

Prints wall and CPU time, peak resident memory (ru_maxrss) and the peak above the memory held
after loading the model, then the ratios, (b)'s memory at several token counts, and how far (b)'s
linearity scores are from (c)'s. The bundled text holds about 61k tokens of prose; larger runs
repeat it (the cost does not depend on what the text says).

    python bench/calibrate.py            # 65,536 tokens; (b) also at 16k and 262k
    python bench/calibrate.py --quick    # a smoke run of a few thousand tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_now_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, tokens: int, seq_len: int, batch_size: int) -> dict:
    import torch

    from compressor.calibrate import calibrate
    from compressor.data import load_texts, make_windows
    from compressor.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    samples = tokens // seq_len
    texts = load_texts(None)
    texts = texts * (1 + tokens // 50_000)
    windows = make_windows(tokenizer, texts, samples, seq_len, seed=0)
    with torch.no_grad():
        model(windows[:1], use_cache=False)  # warm-up, same for every variant
    base = _rss_now_mb()
    start, cpu = time.perf_counter(), time.process_time()
    result: dict = {}
    if variant in ("forward", "blocks"):
        _forward(model, windows, batch_size, blocks_only=variant == "blocks")
    elif variant == "calibrate":
        profile = calibrate(model, windows, batch_size=batch_size)
        result["linearity"] = [b.linearity for b in profile.blocks]
        result["linearity_without_residual"] = [b.linearity_without_residual for b in profile.blocks]
    elif variant == "stored":
        result |= _stored(model, windows, batch_size)
    result |= {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
               "peak_mb": _peak_mb(), "above_load_mb": max(0.0, _peak_mb() - base), "tokens": windows.numel(),
               "threads": torch.get_num_threads()}
    return result


def _forward(model, windows, batch_size, blocks_only):
    import torch

    from compressor.adapters import get_adapter

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    last = get_adapter(model).blocks_of(model)[-1]
    handle = last.register_forward_hook(stop) if blocks_only else None
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                try:
                    model(windows[i:i + batch_size], use_cache=False)
                except Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def _stored(model, windows, batch_size) -> dict:
    """Keep every hidden state (float32, on the CPU), then fit each block by float64 least squares."""
    import torch

    from compressor.adapters import get_adapter

    start = time.perf_counter()
    blocks = get_adapter(model).blocks_of(model)
    states: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]

    def keep_last(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        states[-1].append(h.reshape(-1, h.shape[-1]).clone())

    handle = blocks[-1].register_forward_hook(keep_last)
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                hidden = model(windows[i:i + batch_size], output_hidden_states=True, use_cache=False).hidden_states
                for k, h in enumerate(hidden[:-1]):  # the last one is after the final norm: the hook has it
                    states[k].append(h.reshape(-1, h.shape[-1]))
    finally:
        handle.remove()
    forward_s = time.perf_counter() - start
    stacked = [torch.cat(s) for s in states]
    states.clear()
    scores, without = [], []
    for index in range(len(blocks)):
        x, y = stacked[index].double(), stacked[index + 1].double()
        scores.append(_score(x, y))
        without.append(_score(x, y - x))
    return {"linearity": scores, "linearity_without_residual": without, "forward_s": forward_s,
            "fit_s": time.perf_counter() - start - forward_s}


def _score(x, y) -> float:
    import torch

    x = x - x.mean(0)
    y = y - y.mean(0)
    x, y = x / torch.linalg.norm(x), y / torch.linalg.norm(y)
    a = torch.linalg.lstsq(x, y).solution
    return float(1 - torch.linalg.norm(x @ a - y) ** 2)


def run(variant: str, tokens: int, seq_len: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--seq-len", str(seq_len),
           "--batch-size", str(batch_size)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} at {tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scaling", default=None, help="token counts for (b)'s memory, comma separated")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq_len = args.seq_len or (128 if args.quick else 256)
    tokens = args.tokens or (4096 if args.quick else 65536)
    if args.child:
        print(json.dumps(child(args.child, tokens, seq_len, args.batch_size)))
        return
    scaling = [int(t) for t in (args.scaling or ("2048,8192" if args.quick else "16384,262144")).split(",")]

    results = {name: run(name, tokens, seq_len, args.batch_size)
               for name in ("forward", "blocks", "calibrate", "stored")}
    print(f"SmolLM2-135M, {tokens:,} tokens ({tokens // seq_len} x {seq_len}), batch {args.batch_size}, "
          f"{results['forward']['threads']} threads")
    print(f"{'variant':34s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>9s} {'above load MB':>14s}")
    labels = {"forward": "(a)  plain forward, whole model", "blocks": "(a') forward, decoder blocks only",
              "calibrate": "(b)  compressor calibrate", "stored": "(c)  store states + lstsq"}
    for name, r in results.items():
        print(f"{labels[name]:34s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_mb']:9.0f} {r['above_load_mb']:14.0f}")
    a, a2, b, c = (results[k] for k in ("forward", "blocks", "calibrate", "stored"))
    print(f"time (b)/(a)   wall {b['wall_s'] / a['wall_s']:.3f}  cpu {b['cpu_s'] / a['cpu_s']:.3f}   (goal <= 1.15)")
    print(f"time (b)/(a')  wall {b['wall_s'] / a2['wall_s']:.3f}  cpu {b['cpu_s'] / a2['cpu_s']:.3f}")
    print(f"time (c)/(b)   wall {c['wall_s'] / b['wall_s']:.2f}   ((c): forward {c['forward_s']:.1f} s, "
          f"fits {c['fit_s']:.1f} s)")
    print(f"peak memory (c)/(b): {c['peak_mb'] / b['peak_mb']:.1f}x whole process, "
          f"{c['above_load_mb'] / max(b['above_load_mb'], 1):.1f}x above the loaded model   (goal >= 10x)")
    diffs = [abs(p - q) for key in ("linearity", "linearity_without_residual") for p, q in zip(b[key], c[key])]
    print(f"largest |score (b) - score (c)|: {max(diffs):.2e} over {len(diffs)} scores")

    print(f"\n(b) memory as tokens grow (batch {args.batch_size}):")
    for count in sorted({*scaling, tokens}):
        r = b if count == tokens else run("calibrate", count, seq_len, args.batch_size)
        print(f"  {count:>8,} tokens: peak {r['peak_mb']:6.0f} MB, above load {r['above_load_mb']:6.0f} MB, "
              f"wall {r['wall_s']:7.1f} s")


if __name__ == "__main__":
    main()
