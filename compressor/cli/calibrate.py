from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from compressor.cli.common import (
    AllowPickleOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    SeedOpt,
    device_kwargs,
    distributed,
    emit_json,
    err,
    process_group,
)
from compressor.cli.common import (
    out as console,
)
from compressor.errors import DataError


def calibrate(
    model: ModelArg,
    out: OutOpt,
    data: DataOpt = None,
    field: FieldOpt = "text",
    samples: Annotated[int, typer.Option("--samples", help="Number of token windows.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    spans_max: Annotated[
        int | None, typer.Option("--spans-max", help="Longest span for angular distances (default: all).")
    ] = None,
    intrinsic_dim: Annotated[
        bool, typer.Option("--intrinsic-dim", help="Also estimate intrinsic dimension (TwoNN; slower).")
    ] = False,
    outlier_factor: Annotated[
        float, typer.Option("--outlier-factor", help="Tokens with norm above this x their sequence's median "
                            "are outliers for the *_no_outliers metrics (0: off).")
    ] = 20.0,
    stats: Annotated[bool, typer.Option("--stats", help="Also write the raw float64 statistics.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute even if a cached profile matches.")] = False,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Profile every block: linearity with and without the residual, influence, span distances.

    Under torchrun each rank profiles its share of the windows, the float64 statistics are
    all-reduced (the result equals one process's), and rank 0 writes.
    """
    from compressor.calibrate import profile_for, write_profile
    from compressor.util.io import atomic_dir, check_output

    check_output(out, overwrite)
    if batch_size <= 0:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size})")
    if spans_max is not None and spans_max <= 0:
        raise DataError(f"--spans-max must be at least 1 (got {spans_max})")
    with process_group(device) as (rank, rank_device):
        profile = profile_for(
            model, data, field=field, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
            spans_max=spans_max, intrinsic_dim=intrinsic_dim, exclude_outliers=outlier_factor or None,
            with_stats=stats, cache=not no_cache and not distributed(), dtype=dtype, allow_pickle=allow_pickle,
            **device_kwargs(rank_device),
        )
    if rank != 0:
        return
    with atomic_dir(out, overwrite) as tmp:
        write_profile(profile, tmp, with_stats=stats)
    if json:
        emit_json({"out": str(out), **profile.to_dict()})
        return
    console.print(_table(profile))
    err.print(f"wrote {out}: profile.json, profile.csv, profile.png{', stats.safetensors' if stats else ''}")


def _table(profile) -> Table:
    outliers = any(b.outlier_tokens for b in profile.blocks)
    twonn = profile.blocks[0].intrinsic_dim is not None
    notes = ["linear: linearity score", "w/o res: without the residual"]
    if outliers:
        notes.append("no outl: linearity without outlier tokens (outl: how many)")
    notes += ["infl: block influence", "contrib: relative contribution", "aniso: anisotropy"]
    table = Table(title=f"{profile.model}: {profile.tokens:,} tokens", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="; ".join(notes), caption_justify="left")
    for name in ["block", "linear", "w/o res", *(["no outl", "outl"] if outliers else []),
                 "infl", "contrib", "aniso", *(["int dim"] if twonn else [])]:
        table.add_column(name, justify="right", no_wrap=True)
    for b in profile.blocks:
        row = [str(b.index), f"{b.linearity:.4f}", f"{b.linearity_without_residual:.4f}"]
        if outliers:
            row += [f"{b.linearity_no_outliers:.4f}", str(b.outlier_tokens)]
        row += [f"{b.block_influence:.4f}", f"{b.relative_contribution:.3f}", f"{b.anisotropy:.3f}"]
        if twonn:
            row.append(f"{b.intrinsic_dim:.1f}")
        table.add_row(*row)
    return table
