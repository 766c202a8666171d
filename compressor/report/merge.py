"""`compress report`: several finished `compress model` runs side by side, with one Pareto front."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compressor.errors import DataError, first_line
from compressor.report.figures import merged_figure, pareto_front
from compressor.report.html import figures_html, page, table_html
from compressor.report.schema import Report, is_finite, is_number
from compressor.util.io import atomic_file, write_json

log = logging.getLogger(__name__)

MERGED_KIND = "compressor merged report"


def default_labels(paths: list[Path | str]) -> list[str]:
    """Run labels from directory names: `parent/name` where names collide, then `-2`, `-3` suffixes."""
    paths = [Path(p) for p in paths]
    names = [p.name or p.resolve().name or str(p) for p in paths]
    labels = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    seen: set[str] = set()
    unique = []
    for label in labels:
        candidate, n = label, 1
        while candidate in seen:
            n += 1
            candidate = f"{label}-{n}"
        seen.add(candidate)
        unique.append(candidate)
    return unique


def read_run_report(run_dir: Path | str) -> Report:
    """The report of a finished `compress model` run directory; a DataError if there is none."""
    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    if not run_dir.is_dir() or not path.is_file():
        raise DataError(f"{run_dir} is not a run directory (no report.json): pass directories written by "
                        "`compress model --out`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise DataError(f"cannot read {path}: {reason}") from None
    return Report.from_dict(data, str(path))


def merge_reports(reports: list[Report | dict], labels: list[str], sources: list[str] | None = None) -> dict:
    """One comparative document from several `compress model` reports (one row per run, a Pareto front).

    Perplexities are compared on the evaluation text every run measured; when there is none, each run's
    first is used and `notes` says so. Plain dictionaries are read as report.json contents.
    """
    if not reports:
        raise DataError("no runs to merge: pass one or more `compress model` run directories")
    if len(labels) != len(reports) or len(set(labels)) != len(labels):
        raise DataError("give one distinct label per run")
    if sources is not None and len(sources) != len(reports):
        raise DataError("give one source per run")
    reports = [r if isinstance(r, Report) else Report.from_dict(r, f"run '{label}'")
               for r, label in zip(reports, labels)]
    notes: list[str] = []
    evals = [_eval_names(r) for r in reports]
    shared = [name for name in evals[0] if all(name in names for names in evals[1:])]
    chosen = [shared[0]] * len(reports) if shared else [names[0] for names in evals]
    if not shared:
        notes.append("the runs share no evaluation text: each run's first is used ("
                     + ", ".join(f"{label}: {name}" for label, name in zip(labels, chosen))
                     + "), so their perplexities are not comparable")
    rows, points, skipped = [], [], 0
    for i, (report, label, name) in enumerate(zip(reports, labels, chosen)):
        row = _run_row(report, label, name)
        if sources is not None:
            row["source"] = str(sources[i])
        rows.append(row)
        mine, dropped = _points(report, label, name)
        points += mine
        skipped += dropped
    if skipped:
        notes.append(f"{skipped} sweep point(s) without a latency or a perplexity were left out")
    bad = [p for p in points if not (is_finite(p["latency_ms"]) and is_finite(p["perplexity"]))]
    if bad:
        notes.append("left out of the Pareto front (no finite value): "
                     + ", ".join(f"{p['run']} {p['kind']}" for p in bad))
    where = sorted({(r["backend"], r["device"]) for r in rows}, key=str)
    if len(where) > 1:
        notes.append("latencies were measured on different backends/devices ("
                     + ", ".join(f"{b} / {d}" for b, d in where) + "): compare them with care")
    front = {id(p) for p in pareto_front(points)}
    points = [{**p, "on_pareto": id(p) in front} for p in points]
    pareto = sorted((p for p in points if p["on_pareto"]), key=lambda p: (p["latency_ms"], p["perplexity"]))
    log.debug("merged %d runs: %d points, %d on the Pareto front", len(rows), len(points), len(pareto))
    from compressor import __version__

    return {"kind": MERGED_KIND, "tool": f"compressor {__version__}", "eval": chosen[0] if shared else None,
            "runs": rows, "points": points, "pareto": pareto, "notes": notes}


def _points(report: Report, label: str, name: str) -> tuple[list[dict], int]:
    """The run's original, compressed and sweep points on evaluation text `name`; and how many sweep
    points had no finite latency or perplexity (left out)."""
    ppl, lat = report.perplexity, report.workload_latency_ms
    points = [_point(label, "original", 0, lat.original, ppl.original.get(name), name),
              _point(label, "compressed", len(report.blocks_removed), lat.compressed, ppl.compressed.get(name),
                     name, report.speedup_measured)]
    skipped = 0
    for sweep in report.sweep or []:
        point = _point(label, "sweep", sweep.blocks_removed, sweep.latency_ms, sweep.perplexity.get(name), name,
                       sweep.speedup)
        if not (is_finite(point["latency_ms"]) and is_finite(point["perplexity"])):
            skipped += 1
            continue
        point.update({"drop": sweep.drop, "healed": sweep.healed})
        points.append(point)
    return points, skipped


def write_merged_reports(merged: dict, out_dir: Path | str) -> dict[str, Path]:
    """Write report.json, report.md and report.html (figure embedded) for a merged report."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], merged)
    figure = merged_figure(merged)
    for key, text in (("md", merged_markdown(merged)),
                      ("html", merged_html(merged, {"Perplexity versus latency, all runs": figure} if figure else {}))):
        with atomic_file(paths[key]) as tmp:
            tmp.write_text(text)
    return paths


def _merged_columns(merged: dict) -> tuple[list[str], list[list[str]]]:
    ppl = f"perplexity ({merged['eval']})" if merged.get("eval") else "perplexity (per run)"
    header = ["run", "model", "strategy", "backend / device", "blocks removed", "speedup", "target",
              f"{ppl} original", f"{ppl} compressed", "latency original (ms)", "latency compressed (ms)"]
    rows = []
    for r in merged["runs"]:
        name = r["eval"]
        which = "" if merged.get("eval") else f" ({name})"
        rows.append([
            r["label"], str(r.get("model") or "-"), str(r.get("strategy") or "-"),
            f"{r.get('backend') or '-'} / {r.get('device') or '-'}",
            f"{r['blocks_removed_count']} of {r['blocks_original']} {r['blocks_removed']}",
            _fmt(r.get("speedup_measured"), ".3f", "x"), _target(r),
            _fmt(r["perplexity"]["original"].get(name), ".3f", which),
            _fmt(r["perplexity"]["compressed"].get(name), ".3f", which),
            _fmt(r["workload_latency_ms"]["original"], ".1f"), _fmt(r["workload_latency_ms"]["compressed"], ".1f"),
        ])
    return header, rows


def _pareto_columns(merged: dict) -> tuple[list[str], list[list[str]]]:
    header = ["run", "point", "blocks removed", "latency (ms)", "perplexity"]
    rows = [[p["run"], p["kind"], str(p["blocks_removed"]), _fmt(p["latency_ms"], ".1f"),
             _fmt(p["perplexity"], ".3f")] for p in merged["pareto"]]
    return header, rows


def merged_markdown(merged: dict) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    def table(header, rows):
        return [line(header), "|" + "---|" * len(header), *map(line, rows)]

    n = len(merged["runs"])
    lines = [f"# compressor comparison: {n} run{'s' if n != 1 else ''}", "", *table(*_merged_columns(merged)),
             "", "## Pareto front (perplexity versus workload latency, lower is better)", "",
             *table(*_pareto_columns(merged))]
    if merged.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in merged["notes"]]
    return "\n".join(lines) + "\n"


def merged_html(merged: dict, figures: dict[str, bytes]) -> str:
    import html

    notes = "".join(f"<li>{html.escape(n)}</li>" for n in merged.get("notes", []))
    body = (f"<h1>compressor comparison: {len(merged['runs'])} runs</h1>\n{table_html(*_merged_columns(merged))}\n"
            f"{f'<ul>{notes}</ul>' if notes else ''}\n{figures_html(figures)}\n"
            "<h2>Pareto front (perplexity versus workload latency, lower is better)</h2>\n"
            f"{table_html(*_pareto_columns(merged))}")
    return page("compressor comparison", body)


def _eval_names(report: Report) -> list[str]:
    compressed = report.perplexity.compressed
    names = [n for n in report.perplexity.original if n in compressed]
    return names or list(compressed)


def _run_row(report: Report, label: str, eval_name: str) -> dict:
    backend, settings = report.backend, report.settings
    return {
        "label": label,
        "model": report.model or None,
        "strategy": report.strategy,
        "backend": backend.name or settings.get("backend"),
        "device": backend.device or settings.get("device"),
        "threads": backend.threads if backend.threads is not None else settings.get("threads"),
        "blocks_original": report.blocks_original,
        "blocks_removed_count": len(report.blocks_removed),
        "blocks_removed": list(report.blocks_removed),
        "blocks_linearized": list(report.blocks_linearized),
        "target_speedup": report.target_speedup,
        "max_ppl_increase": report.max_ppl_increase,
        "speedup_measured": report.speedup_measured,
        "target_met": report.target_met,
        "eval": eval_name,
        "perplexity": {"original": dict(report.perplexity.original),
                       "compressed": dict(report.perplexity.compressed)},
        "workload_latency_ms": {"original": report.workload_latency_ms.original,
                                "compressed": report.workload_latency_ms.compressed},
        "sweep_points": len(report.sweep or []),
    }


def _point(run: str, kind: str, removed, latency, perplexity, eval_name: str, speedup=None) -> dict:
    point = {"run": run, "kind": kind, "blocks_removed": removed, "latency_ms": latency,
             "perplexity": perplexity, "eval": eval_name}
    if speedup is not None:
        point["speedup"] = speedup
    return point


def _target(row: dict) -> str:
    met = {True: "met", False: "NOT met"}.get(row.get("target_met"), "-")
    if row.get("target_speedup"):
        return f"{row['target_speedup']:.2f}x {met}"
    if row.get("max_ppl_increase") is not None:
        return f"ppl +{row['max_ppl_increase']:.0%} {met}"
    return met


def _fmt(value, spec: str, suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if is_number(value) else "-"
