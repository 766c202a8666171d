"""Train a small Llama-style model from scratch without and with the cosine regularizer of
"Your Transformer is Secretly Linear" (arXiv 2405.12250), and compare linearity and perplexity.

Every run starts from the same weights (same seed), sees the same windows in the same order (the
same number of tokens), and differs only in the loss:

    loss = next-token cross-entropy + W * mean_l mean_tokens cos(h_l, h_{l+1})

where h_0 is the input of block 0 and h_{l+1} the output of block l (LinearityRegularizer); W = 0 is
the baseline. Each model is then profiled with compressor.calibrate (the paper's linearity score per
block, with and without the residual) and scored by perplexity on held-out Wikipedia text.

    python examples/cosine_regularizer.py                      # W = 0 and 0.05: a few minutes on 2 cores
    python examples/cosine_regularizer.py --weight 0.05,-0.05  # also the opposite sign
    python examples/cosine_regularizer.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from compressor.calibrate import calibrate
from compressor.data import load_texts, make_windows
from compressor.evaluate import load_eval_tokens, perplexity
from compressor.heal import LinearityRegularizer, capture_hidden_states, consecutive_cosine, lm_loss
from compressor.loading import load_tokenizer, resolve

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small_llama(vocab_size: int, seq_len: int, width: int, depth: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=depth, num_attention_heads=max(1, width // 32),
                         max_position_embeddings=seq_len, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def train(model, windows: torch.Tensor, steps: int, batch: int, lr: float, weight: float, seed: int) -> list[float]:
    """AdamW, 5% warm-up then cosine decay; windows in one seeded order. Returns the LM loss per step."""
    regularizer = LinearityRegularizer(weight) if weight else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    with capture_hidden_states(model) as states:
        for step in range(steps):
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            idx = order[(torch.arange(batch) + step * batch) % len(windows)]
            ids = windows[idx]
            lm = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss = lm + regularizer(states) if regularizer else lm
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(lm.item())
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                cos = f"  mean cos {(loss - lm).item() / weight:.3f}" if regularizer else ""
                print(f"  step {step:4d}/{steps}  lm loss {lm.item():.3f}{cos}", flush=True)
    return losses


def evaluate(model, tokenizer, test_ids: torch.Tensor, profile_windows: torch.Tensor, seq_len: int) -> dict:
    model.eval()
    with torch.no_grad():
        ppl = perplexity(model, test_ids, max_length=seq_len, stride=seq_len // 2).perplexity
        with capture_hidden_states(model) as states:
            model(input_ids=profile_windows[:8])
            mean_cos = float(consecutive_cosine(states))
    profile = calibrate(model, profile_windows, batch_size=8)
    return {
        "perplexity": ppl,
        "mean_cos_consecutive": mean_cos,
        "linearity": [b.linearity for b in profile.blocks],
        "linearity_without_residual": [b.linearity_without_residual for b in profile.blocks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", type=lambda v: [float(w) for w in v.split(",")], default=[0.05],
                        help="regularizer weight(s) to compare with the baseline, e.g. 0.05,-0.05 (default 0.05)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; --quick 20)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (20 if args.quick else 300)

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    train_windows = make_windows(tokenizer, load_texts(args.data / "wiki.train.txt"),
                                 min(steps * args.batch, 4000), args.seq_len, seed=args.seed)
    test_ids = load_eval_tokens(tokenizer, args.data / "wiki.test.txt", max_tokens=4096 if args.quick else 16384)
    profile_windows = make_windows(tokenizer, load_texts(args.data / "wiki.valid.txt"), 16 if args.quick else 64,
                                   args.seq_len, seed=args.seed)
    tokens = steps * args.batch * args.seq_len
    print(f"{args.depth} blocks x {args.width} wide, {steps} steps x {args.batch} x {args.seq_len} = {tokens} tokens "
          f"per run, regularizer weights {args.weight} against 0")

    results = {}
    for weight in [0.0, *args.weight]:
        name = f"W={weight:g}"
        print(f"\n{name}{' (baseline)' if weight == 0 else ''}:")
        model = small_llama(len(tokenizer), args.seq_len, args.width, args.depth, args.seed)
        start = time.perf_counter()
        losses = train(model, train_windows, steps, args.batch, args.lr, weight, args.seed)
        results[name] = {"weight": weight, "train_seconds": round(time.perf_counter() - start, 1),
                         "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
                         **evaluate(model, tokenizer, test_ids, profile_windows, args.seq_len)}
    print_table(results, args.depth)
    if args.json:
        settings = vars(args) | {"data": str(args.data), "json": None, "steps": steps, "tokens": tokens}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))


def print_table(results: dict, depth: int) -> None:
    names = list(results)
    width = 11 * len(names)
    print(f"\n{'':>5} {'linearity':^{width}} {'linearity without residual':^{width}}")
    print(f"{'block':>5} " + "".join(f"{n:>11}" for n in names) + " " + "".join(f"{n:>11}" for n in names))
    for i in range(depth):
        row = "".join(f"{results[n]['linearity'][i]:>11.4f}" for n in names)
        row_res = "".join(f"{results[n]['linearity_without_residual'][i]:>11.4f}" for n in names)
        print(f"{i:>5} {row} {row_res}")
    mean = "".join(f"{sum(results[n]['linearity']) / depth:>11.4f}" for n in names)
    mean_res = "".join(f"{sum(results[n]['linearity_without_residual']) / depth:>11.4f}" for n in names)
    print(f"{'mean':>5} {mean} {mean_res}")
    print(f"\n{'':<28}" + "".join(f"{n:>11}" for n in names))
    for label, key, fmt in (("mean cos(h_l, h_l+1)", "mean_cos_consecutive", ".4f"),
                            ("perplexity on wiki.test", "perplexity", ".2f"),
                            ("final training loss", "final_train_loss", ".3f"),
                            ("training seconds", "train_seconds", ".0f")):
        print(f"{label:<28}" + "".join(f"{results[n][key]:>11{fmt}}" for n in names))


if __name__ == "__main__":
    main()
