from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compressor.cli.common import JsonOpt, OutOpt, OverwriteOpt, emit_json, err
from compressor.cli.common import out as console


def report(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="Run directories written by `compress model --out` (each holds report.json).",
        show_default=False)] = None,
    out: OutOpt = ...,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Merge finished `compress model` runs into one comparative report (table and Pareto front).

    Reads every report.json as a typed compressor.report.Report (older, unversioned files included).
    """
    from compressor.errors import DataError
    from compressor.report import default_labels, merge_reports, read_run_report, write_merged_reports
    from compressor.util.io import atomic_dir, check_output

    runs = list(runs or [])
    if not runs:
        raise DataError("no runs given: pass one or more run directories written by `compress model --out`")
    check_output(out, overwrite)
    target = out.resolve()
    for run in runs:
        resolved = run.resolve()
        if resolved == target or target in resolved.parents:
            raise DataError(f"--out {out} would replace the run {run}: choose another --out")
    reports = [read_run_report(run) for run in runs]
    merged = merge_reports(reports, default_labels(runs), sources=[str(run) for run in runs])
    with atomic_dir(out, overwrite) as tmp:
        write_merged_reports(merged, tmp)
    if json:
        emit_json(merged)
        return
    from compressor.report import merged_markdown

    console.print(merged_markdown(merged), highlight=False, markup=False, soft_wrap=True)
    err.print(f"reports: {out / 'report.md'}, {out / 'report.html'}", highlight=False, markup=False)
