from __future__ import annotations

from typing import Annotated

import typer

from compressor.cli.common import (
    AllowPickleOpt,
    DataOpt,
    FieldOpt,
    JsonOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    emit_json,
    err,
)
from compressor.cli.plan import SamplesOpt, SeqLenOpt


def linearize(
    model: ModelArg,
    blocks: Annotated[str, typer.Option("--blocks", help="Blocks to replace by a linear map, e.g. 12-15.")],
    out: OutOpt,
    form: Annotated[str, typer.Option("--form", help="map (ReplaceMe: fold a d x d map into the projection) "
                                      "or projection (refit the projection on its own input).")] = "map",
    data: DataOpt = None,
    field: FieldOpt = "text",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Replace spans of blocks by linear maps fitted on calibration text, folded into existing weights."""
    from compressor.data import load_texts, make_windows
    from compressor.errors import InvalidPlanError
    from compressor.loading import load_model
    from compressor.select.linear import linear_spans, linearize_
    from compressor.select.maps import FORMS, FitSettings
    from compressor.surgery.edit import save_checkpoint
    from compressor.util.io import atomic_dir, check_output

    if form not in FORMS:
        raise InvalidPlanError(f"unknown --form '{form}': choose one of {', '.join(FORMS)}")
    check_output(out, overwrite)
    loaded, tokenizer = load_model(model, dtype="auto", allow_pickle=allow_pickle)
    linear_spans(loaded, blocks)  # refuse before reading any data
    windows = make_windows(tokenizer, load_texts(data, field), samples, seq_len, seed)
    plan = linearize_(loaded, blocks, windows, FitSettings(form=form))
    with atomic_dir(out, overwrite) as tmp:
        save_checkpoint(loaded, tokenizer, tmp)
    record = loaded.config.compressor
    if json:
        emit_json({"out": str(out), **record, "fit": plan.provenance["fit"]})
    else:
        err.print(plan.summary(), highlight=False)
        err.print(f"wrote {out}: {len(record['kept'])} of {record['blocks_original']} blocks")
