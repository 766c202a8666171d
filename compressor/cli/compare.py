from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import AllowPickleOpt, DataOpt, JsonOpt, ModelArg, SeedOpt, emit_json, err, out
from compressor.cli.plan import SamplesOpt, SeqLenOpt


def compare(
    model: ModelArg,
    drop: Annotated[str, typer.Option("--drop", "-k", help="Numbers of blocks to remove, e.g. 3,6,9.")] = "3,6,9",
    strategies: Annotated[str, typer.Option("--strategies", help="Comma-separated strategies.")]
    = "influence,linearity,angular,greedy,auto",
    linear: Annotated[str, typer.Option("--linear", help="both, on or off: plans with linear maps, without, or both.")]
    = "both",
    data: DataOpt = None,
    eval_file: Annotated[Path | None, typer.Option("--eval", help="Evaluation text (default: bundled text).")] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Evaluate the first N tokens.")] = 16384,
    max_length: Annotated[int, typer.Option("--max-length", help="Perplexity window, tokens.")] = 512,
    stride: Annotated[int, typer.Option("--stride", help="Perplexity window step, tokens.")] = 256,
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Perplexity of every strategy's plan, with and without linear maps, next to the unpruned model."""
    from compressor.data import load_texts, make_windows
    from compressor.errors import InvalidPlanError
    from compressor.evaluate import load_eval_tokens
    from compressor.loading import load_model
    from compressor.select import check_k, get_strategy
    from compressor.select.compare import compare_strategies

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        get_strategy(name)
    variants = {"both": (False, True), "on": (True,), "off": (False,)}.get(linear)
    if variants is None:
        raise InvalidPlanError(f"--linear must be both, on or off (got '{linear}')")
    try:
        ks = [int(k) for k in drop.split(",") if k.strip()]
    except ValueError:
        raise InvalidPlanError(f"--drop takes numbers of blocks like 3,6,9 (got '{drop}')") from None
    loaded, tokenizer = load_model(model, allow_pickle=allow_pickle)
    check_k(loaded, ks)
    windows = make_windows(tokenizer, load_texts(data), samples, seq_len, seed)
    eval_ids = load_eval_tokens(tokenizer, eval_file, max_tokens=eval_tokens)
    result = compare_strategies(
        loaded, windows, eval_ids, ks, names, variants, max_length=max_length, stride=stride,
        on_row=None if json else lambda r: err.print(f"K={r.k} {r.label}: {r.perplexity:.2f}", highlight=False))
    if json:
        emit_json(result.to_dict())
    else:
        out.print(result.markdown(), highlight=False)
