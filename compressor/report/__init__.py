"""Run reports: report.json (the typed `Report`, everything to reproduce a run), report.md (for a pull
request) and report.html (one self-contained file with its figures embedded as PNG data URIs); and
`compress report`, which merges finished runs into one comparison."""

from __future__ import annotations

from pathlib import Path

from compressor.report.figures import pareto_front, profile_figure, tradeoff_figure
from compressor.report.html import to_html
from compressor.report.markdown import baseline_header, baseline_rows, headline, summary_rows, to_markdown
from compressor.report.merge import (
    MERGED_KIND,
    default_labels,
    merge_reports,
    merged_html,
    merged_markdown,
    read_run_report,
    write_merged_reports,
)
from compressor.report.schema import (
    SCHEMA_VERSION,
    Attempt,
    BackendInfo,
    Baseline,
    Pair,
    Perplexities,
    Report,
    SweepPoint,
    TradeoffPoint,
)
from compressor.util.io import atomic_file, write_json

__all__ = [
    "MERGED_KIND", "SCHEMA_VERSION", "Attempt", "BackendInfo", "Baseline", "Pair", "Perplexities", "Report", "SweepPoint",
    "TradeoffPoint", "baseline_header", "baseline_rows", "default_labels", "headline", "merge_reports", "merged_html", "merged_markdown",
    "pareto_front", "read_run_report", "summary_rows", "to_html", "to_markdown", "write_merged_reports",
    "write_reports",
]


def write_reports(report: Report, out_dir: Path | str, profile: dict | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `out_dir`, each atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], report.to_dict())
    figures = {"Linearity profile (removed blocks marked)": profile_figure(profile, report) if profile else None,
               "Perplexity versus latency": tradeoff_figure(report)}
    for key, text in (("md", to_markdown(report)),
                      ("html", to_html(report, {k: v for k, v in figures.items() if v}))):
        with atomic_file(paths[key]) as tmp:
            tmp.write_text(text)
    return paths
