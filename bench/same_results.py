"""Plans and perplexities through the front-door verbs only, as one JSON line: run it on two checkouts
(e.g. before and after a refactoring) and compare the lines; they must be equal.

    PYTHONPATH=/path/to/old/checkout python bench/same_results.py > old.json
    python bench/same_results.py > new.json

A tiny llama through `compressor.compress` under a 50% perplexity budget (no timing decides anything),
and SmolLM2: its profile, the `auto` plan for 5 blocks on 8 x 128 windows, perplexity pruned and after
3 healing steps.
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_tokenizer, tiny_model

import compressor


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = {"compressor": compressor.__file__}
    model, tok = tiny_model("llama"), make_tokenizer()
    rep = compressor.compress(model, tok, max_ppl_increase=0.5, backend="torch", threads=1, prefill_tokens=32,
                              new_tokens=8, samples=8, seq_len=32, timing_seconds=0.2, format="none", heal_steps=3)
    out["tiny"] = {"removed": rep.blocks_removed, "linearized": rep.blocks_linearized,
                   "ppl": {k: getattr(rep.perplexity, k) for k in ("original", "pruned_before_heal", "compressed")}}
    model, tok = compressor.load_model("smollm2-135m")
    windows = compressor.make_windows(tok, compressor.load_texts(None), 8, 128, seed=0)
    profile = compressor.profile(model, windows)
    plan = compressor.plan_blocks(model, windows, 5, profile=profile)[5]
    teacher = copy.deepcopy(model)
    compressor.apply_plan_(model, plan)
    ids = windows.flatten()[:1024]
    pruned = compressor.perplexity(model, ids).perplexity
    compressor.heal_(model, teacher, windows, config=compressor.HealConfig(steps=3))
    out["smollm2"] = {"linearity": [round(b.linearity, 12) for b in profile.blocks], "drop": plan.drop,
                      "linearize": plan.linearize, "pruned_ppl": pruned,
                      "healed_ppl": compressor.perplexity(model, ids).perplexity}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
