from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import (
    AllowPickleOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    SeedOpt,
    device_kwargs,
    emit_json,
    err,
    process_group,
)

StrategyOpt = Annotated[str, typer.Option("--strategy", "-s", help="auto, greedy, angular, influence or linearity.")]
LinearOpt = Annotated[bool, typer.Option("--linear/--no-linear",
                                         help="Replace removed spans by fitted linear maps where possible.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]


def plan(
    model: ModelArg,
    drop: Annotated[int, typer.Option("--drop", "-k", help="Number of blocks to remove.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write plan.json (maps go beside it).")],
    strategy: StrategyOpt = "auto",
    linear: LinearOpt = True,
    data: DataOpt = None,
    field: FieldOpt = "text",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Choose the blocks to remove (and fit linear replacements); write a plan for `compress prune --plan`.

    Under torchrun the search runs data-parallel (each rank scores and fits on its share of the
    windows; every rank makes the same choices) and rank 0 writes the plan.
    """
    from compressor.data import load_texts, make_windows
    from compressor.loading import load_model
    from compressor.select import check_k, get_strategy
    from compressor.surgery.plan import write_plan
    from compressor.util.io import check_output

    get_strategy(strategy)
    check_output(out, overwrite)
    for sibling in (out.with_name(f"{out.stem}.maps.safetensors"),):
        check_output(sibling, overwrite)
    with process_group(device) as (rank, rank_device):
        loaded, tokenizer = load_model(model, dtype=dtype, allow_pickle=allow_pickle, **device_kwargs(rank_device))
        check_k(loaded, drop)
        windows = make_windows(tokenizer, load_texts(data, field), samples, seq_len, seed)
        result = _make_plan(loaded, windows, drop, strategy, linear)
    if rank != 0:
        return
    result.provenance["model"] = str(model)
    result.provenance["windows"] |= {"data": str(data) if data else "bundled", "seed": seed}
    write_plan(result, out)
    if json:
        emit_json({"out": str(out), **result.to_dict()})
    else:
        err.print(result.summary(), highlight=False)
        err.print(f"wrote {out}" + (f" and {result.maps_file}" if result.maps_file else ""))


def _make_plan(model, windows, drop: int, strategy: str, linear: bool):
    """The plan, profiling first (cached) when the strategy reads the profile; its time counts in the cost."""
    import time

    from compressor.calibrate import profile_for
    from compressor.select import SelectSettings, get_strategy, plan_blocks

    start = time.perf_counter()
    profile = profile_for(model, windows) if get_strategy(strategy).needs_profile else None
    seconds = round(time.perf_counter() - start, 2)
    result = plan_blocks(model, windows, drop, strategy, profile=profile, settings=SelectSettings(linear=linear))[drop]
    result.cost["profile_seconds"] = seconds
    result.cost["seconds"] = round(result.cost["seconds"] + seconds, 2)
    return result
