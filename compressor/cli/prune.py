from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import AllowPickleOpt, JsonOpt, ModelArg, OutOpt, OverwriteOpt, emit_json, err
from compressor.errors import InvalidPlanError


def prune(
    model: ModelArg,
    out: OutOpt,
    blocks: Annotated[str | None, typer.Option("--blocks", help="Blocks to remove, e.g. 3,5-7.")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="A plan.json from `compress plan`.")] = None,
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    json: JsonOpt = False,
) -> None:
    """Remove decoder blocks (or apply a plan) and write a standard checkpoint."""
    from compressor.blocks import num_blocks, parse_blocks
    from compressor.loading import load_model
    from compressor.surgery.edit import drop_blocks_, save_checkpoint
    from compressor.util.io import atomic_dir, check_output

    if (blocks is None) == (plan is None):
        raise InvalidPlanError("pass exactly one of --blocks or --plan")
    check_output(out, overwrite)
    loaded, tokenizer = load_model(model, dtype="auto", allow_pickle=allow_pickle)
    if plan is not None:
        from compressor.surgery.plan import apply_plan_, read_plan

        apply_plan_(loaded, read_plan(plan))
    else:
        drop_blocks_(loaded, parse_blocks(blocks, num_blocks(loaded)))
    with atomic_dir(out, overwrite) as tmp:
        save_checkpoint(loaded, tokenizer, tmp)
    record = loaded.config.compressor
    if json:
        emit_json({"out": str(out), **record})
    else:
        linear = "".join(f", {s['start']}-{s['end'] - 1} replaced by a linear map" for s in record["linearized"])
        err.print(f"wrote {out}: {len(record['kept'])} of {record['blocks_original']} blocks "
                  f"(removed {record['removed']}{linear})")
