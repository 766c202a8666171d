"""Run reports: report.json (everything, to reproduce), report.md (for a pull request) and
report.html (one self-contained file with its figures embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from pathlib import Path

from compressor.io import write_json
from compressor.plan import ranges_text

log = logging.getLogger(__name__)


def write_reports(report: dict, out_dir: Path | str, profile: dict | None = None) -> dict[str, Path]:
    """Write the three report files into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], report)
    paths["md"].write_text(to_markdown(report))
    figures = {
        "Linearity profile (removed blocks marked)": profile_figure(profile, report) if profile else None,
        "Perplexity versus latency": tradeoff_figure(report),
    }
    paths["html"].write_text(to_html(report, {k: v for k, v in figures.items() if v}))
    return paths


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, original, compressed) rows shared by the markdown and HTML reports."""
    rows = [("blocks", str(report["blocks_original"]),
             str(report["blocks_original"] - len(report["blocks_removed"])))]
    params = report.get("parameters", {})
    if params:
        rows.append(("parameters", f"{params['original']:,}", f"{params['compressed']:,}"))
    size = report.get("size_bytes", {})
    if size:
        rows.append(("size on disk (MB)", f"{size['original'] / 1e6:.1f}", f"{size['compressed'] / 1e6:.1f}"))
    lat = report.get("latency", {})
    original, compressed = lat.get("original", {}), lat.get("compressed", {})
    for key, label in (("prefill", "prefill"), ("decode", "decode per token")):
        for a, b in zip(original.get(key, []), compressed.get(key, [])):
            shape = a.get("shape", "")
            for stat in ("p50_ms", "p90_ms"):
                rows.append((f"{label} {shape} {stat}", f"{a[stat]:.2f}", f"{b[stat]:.2f}"))
            rows.append((f"{label} {shape} tokens/s", f"{a['tokens_per_s']:.1f}", f"{b['tokens_per_s']:.1f}"))
    workload = report.get("workload_latency_ms", {})
    if workload:
        rows.append(("workload latency (ms)", f"{workload['original']:.1f}", f"{workload['compressed']:.1f}"))
    for name, ppl in report.get("perplexity", {}).get("original", {}).items():
        new = report["perplexity"]["compressed"].get(name)
        rows.append((f"perplexity ({name})", f"{ppl:.3f}", f"{new:.3f}" if new is not None else "-"))
    return rows


def headline(report: dict) -> str:
    target = report.get("target_speedup")
    measured = report.get("speedup_measured")
    parts = []
    if measured is not None:
        goal = f" (target {target:.2f}x, {'met' if report.get('target_met') else 'NOT met'})" if target else ""
        parts.append(f"speedup {measured:.3f}x{goal}")
    increase = report.get("perplexity_increase")
    if increase:
        parts.append(", ".join(f"perplexity {name} {v:+.1%}" for name, v in increase.items()))
    removed = report["blocks_removed"]
    parts.append(f"{len(removed)} of {report['blocks_original']} blocks removed ({ranges_text(removed)})")
    spans = report.get("blocks_linearized") or []
    if spans:
        parts.append("replaced by linear maps: " + ", ".join(
            ranges_text(range(s["start"], s["end"])) + (f" ({s['form']})" if s.get("form") else "") for s in spans))
    return "; ".join(parts)


def to_markdown(report: dict) -> str:
    lines = [f"# compressor report: {report.get('model', '')}", "", headline(report), "",
             "| metric | original | compressed |", "|---|---:|---:|"]
    lines += [f"| {m} | {a} | {b} |" for m, a, b in summary_rows(report)]
    backend = report.get("backend", {})
    if backend:
        where = f"{backend.get('name')} / {backend.get('device')} ({backend.get('threads', '?')} threads)"
        lines += ["", f"Measured on {where}; workload: {report.get('workload', '')}."]
    if report.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in report["notes"]]
    sweep = report.get("sweep") or []
    if sweep:
        names = list(sweep[0]["perplexity"])
        points = _sweep_points(sweep)
        front = {id(p) for p in pareto_front(points)}
        lines += ["", "Sweep (training-free, each level measured against the original in alternation):", "",
                  "| blocks removed | speedup | workload latency (ms) | " + " | ".join(f"perplexity ({n})" for n in names)
                  + " | Pareto |", "|---:|---:|---:|" + "---:|" * len(names) + "---|"]
        for p, point in zip(sweep, points):
            ppl = " | ".join(f"{p['perplexity'][n]:.3f}" for n in names)
            lines.append(f"| {p['blocks_removed']} | {p['speedup']:.3f}x | {p['latency_ms']:.1f} | {ppl} | "
                         f"{'yes' if id(point) in front else ''} |")
    artifacts = report.get("artifacts", {})
    if artifacts:
        lines += ["", "Artifacts:"] + [f"- {k}: `{v}`" for k, v in artifacts.items()]
    return "\n".join(lines) + "\n"


def to_html(report: dict, figures: dict[str, bytes]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(m)}</td><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for m, a, b in
                   summary_rows(report))
    figs = _figures_html(figures)
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compressor report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}td+td{{text-align:right}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>compressor report: {esc(str(report.get('model', '')))}</h1>
<p><strong>{esc(headline(report))}</strong></p>
<table><tr><th>metric</th><th>original</th><th>compressed</th></tr>{rows}</table>
{f'<ul>{notes}</ul>' if notes else ''}
{figs}
</body></html>
"""


def _figures_html(figures: dict[str, bytes]) -> str:
    """Figures as <figure> elements with the PNG embedded as a data URI (one self-contained file)."""
    esc = html.escape
    return "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(title)}</figcaption></figure>" for title, png in figures.items())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def profile_figure(profile: dict, report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = profile["blocks"]
    idx = [b["index"] for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(idx, [b["linearity"] for b in blocks], "o-", label="linearity (with residual)")
    ax.plot(idx, [b["linearity_without_residual"] for b in blocks], "s-", label="linearity without residual")
    ax.plot(idx, [b["block_influence"] for b in blocks], "^-", alpha=0.6, label="block influence")
    for span in report.get("blocks_linearized", []):
        ax.axvspan(span["start"] - 0.5, span["end"] - 0.5, color="orange", alpha=0.2)
    for i in report.get("blocks_removed", []):
        ax.axvline(i, color="red", alpha=0.35, lw=6)
    ax.set_xlabel("block")
    ax.set_ylabel("score")
    ax.set_title("removed blocks in red, linearized spans shaded")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _sweep_points(sweep: list[dict]) -> list[dict]:
    """Sweep entries as figure points: latency, and perplexity on the first eval text."""
    return [{"label": f"-{p['blocks_removed']}", "latency_ms": p["latency_ms"],
             "perplexity": next(iter(p["perplexity"].values()), float("nan"))} for p in sweep]


def tradeoff_figure(report: dict) -> bytes | None:
    points = report.get("tradeoff", [])
    sweep = _sweep_points(report.get("sweep") or [])
    if not points and not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if sweep:
        ax.plot([p["latency_ms"] for p in sweep], [p["perplexity"] for p in sweep], "o", color="0.6",
                label="sweep (blocks removed, no healing)")
        for p in sweep:
            ax.annotate(p["label"], (p["latency_ms"], p["perplexity"]), fontsize=7, color="0.4", xytext=(3, -9),
                        textcoords="offset points")
        front = pareto_front(sweep + [p for p in points if p["label"] != "pruned (before healing)"])
        if len(front) > 1:
            ax.step([p["latency_ms"] for p in front], [p["perplexity"] for p in front], where="post",
                    color="tab:green", alpha=0.7, label="Pareto front")
        ax.legend(fontsize=8)
    for p in points:
        ax.scatter(p["latency_ms"], p["perplexity"], s=40)
        ax.annotate(p["label"], (p["latency_ms"], p["perplexity"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("workload latency (ms)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity versus latency")
    ax.grid(alpha=0.3)
    return _png(fig)


# --- merged reports: several `compress model` runs side by side -------------------------------------

MERGED_KIND = "compressor merged report"
_REQUIRED = ("blocks_original", "blocks_removed", "perplexity", "workload_latency_ms")


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (lower `latency_ms` and `perplexity` are better), by latency.

    A point is dominated when another is no worse on both and better on one; equal points are all kept.
    Points with a missing or non-finite value are ignored.
    """
    usable = [p for p in points if _finite(p.get("latency_ms")) and _finite(p.get("perplexity"))]
    usable.sort(key=lambda p: (p["latency_ms"], p["perplexity"]))
    front: list[dict] = []
    best_before = math.inf  # lowest perplexity among points strictly faster than the current group
    i = 0
    while i < len(usable):
        j = i
        while j < len(usable) and usable[j]["latency_ms"] == usable[i]["latency_ms"]:
            j += 1
        group_best = usable[i]["perplexity"]  # the group is sorted by perplexity
        if group_best < best_before:
            front += [p for p in usable[i:j] if p["perplexity"] == group_best]
            best_before = group_best
        i = j
    return front


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


def check_run_report(report, where: str) -> dict:
    """Raise a DataError unless `report` looks like a `compress model` report.json; returns it."""
    from compressor.errors import DataError

    if not isinstance(report, dict):
        raise DataError(f"{where} is not a compress model report (not a JSON object)")
    missing = [k for k in _REQUIRED if k not in report]
    if missing:
        raise DataError(f"{where} is not a compress model report (missing {', '.join(missing)})")
    ppl, lat = report["perplexity"], report["workload_latency_ms"]
    if not (isinstance(ppl, dict) and isinstance(ppl.get("original"), dict) and ppl["original"]
            and isinstance(ppl.get("compressed"), dict) and ppl["compressed"]):
        raise DataError(f"{where} has no original and compressed perplexities")
    if not (isinstance(lat, dict) and all(_number(lat.get(k)) for k in ("original", "compressed"))):
        raise DataError(f"{where} has no original and compressed workload latencies")
    if not isinstance(report["blocks_removed"], list):
        raise DataError(f"{where}: blocks_removed is not a list")
    return report


def read_run_report(run_dir: Path | str) -> dict:
    """The report.json of a finished `compress model` run directory; a DataError if there is none."""
    import json

    from compressor.errors import DataError

    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    if not run_dir.is_dir() or not path.is_file():
        raise DataError(f"{run_dir} is not a run directory (no report.json): pass directories written by "
                        "`compress model --out`")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DataError(f"cannot read {path}: {reason}") from None
    return check_run_report(report, str(path))


def merge_reports(reports: list[dict], labels: list[str], sources: list[str] | None = None) -> dict:
    """One comparative document from several `compress model` reports (one row per run, a Pareto front).

    Perplexities are compared on the evaluation text every run measured; when there is none, each run's
    first is used and `notes` says so.
    """
    from compressor.errors import DataError

    if not reports:
        raise DataError("no runs to merge: pass one or more `compress model` run directories")
    if len(labels) != len(reports) or len(set(labels)) != len(labels):
        raise DataError("give one distinct label per run")
    if sources is not None and len(sources) != len(reports):
        raise DataError("give one source per run")
    for report, label in zip(reports, labels):
        check_run_report(report, f"run '{label}'")
    notes: list[str] = []
    evals = [_eval_names(r) for r in reports]
    shared = [name for name in evals[0] if all(name in names for names in evals[1:])]
    if shared:
        chosen = [shared[0]] * len(reports)
    else:
        chosen = [names[0] for names in evals]
        notes.append("the runs share no evaluation text: each run's first is used ("
                     + ", ".join(f"{label}: {name}" for label, name in zip(labels, chosen))
                     + "), so their perplexities are not comparable")
    rows, points = [], []
    skipped = 0
    for i, (report, label, name) in enumerate(zip(reports, labels, chosen)):
        row = _run_row(report, label, name)
        if sources is not None:
            row["source"] = str(sources[i])
        rows.append(row)
        ppl, lat = report["perplexity"], report["workload_latency_ms"]
        removed = len(report["blocks_removed"])
        points.append(_point(label, "original", 0, lat["original"], ppl["original"].get(name), name))
        points.append(_point(label, "compressed", removed, lat["compressed"], ppl["compressed"].get(name), name,
                             report.get("speedup_measured")))
        for sweep in report.get("sweep") or []:
            value = sweep.get("perplexity") if isinstance(sweep, dict) else None
            value = value.get(name) if isinstance(value, dict) else value
            point = _point(label, "sweep", sweep.get("blocks_removed"), sweep.get("latency_ms"), value, name,
                           sweep.get("speedup")) if isinstance(sweep, dict) else None
            if point is None or not (_finite(point["latency_ms"]) and _finite(point["perplexity"])):
                skipped += 1
                continue
            point.update({key: sweep[key] for key in ("drop", "healed") if key in sweep})
            points.append(point)
    if skipped:
        notes.append(f"{skipped} sweep point(s) without a latency or a perplexity were left out")
    bad = [p for p in points if not (_finite(p["latency_ms"]) and _finite(p["perplexity"]))]
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

    return {
        "kind": MERGED_KIND,
        "tool": f"compressor {__version__}",
        "eval": chosen[0] if shared else None,
        "runs": rows,
        "points": points,
        "pareto": pareto,
        "notes": notes,
    }


def write_merged_reports(merged: dict, out_dir: Path | str) -> dict[str, Path]:
    """Write report.json, report.md and report.html (figure embedded) for a merged report."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], merged)
    paths["md"].write_text(merged_markdown(merged))
    figure = merged_figure(merged)
    paths["html"].write_text(merged_html(merged, {"Perplexity versus latency, all runs": figure} if figure else {}))
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
    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    figs = _figures_html(figures)
    notes = "".join(f"<li>{esc(n)}</li>" for n in merged.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compressor comparison</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px}}
td+td{{text-align:right}}figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>compressor comparison: {len(merged['runs'])} runs</h1>
{table(*_merged_columns(merged))}
{f'<ul>{notes}</ul>' if notes else ''}
{figs}
<h2>Pareto front (perplexity versus workload latency, lower is better)</h2>
{table(*_pareto_columns(merged))}
</body></html>
"""


def merged_figure(merged: dict) -> bytes | None:
    """Perplexity versus latency: each run in its own colour and marker, the Pareto front as a step line."""
    points = [p for p in merged.get("points", []) if _finite(p["latency_ms"]) and _finite(p["perplexity"])]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^vPX*<>ph"
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(merged["runs"]):
        colour, marker = colours[i % len(colours)], markers[i % len(markers)]
        mine = [p for p in points if p["run"] == row["label"]]
        sweep = sorted((p for p in mine if p["kind"] == "sweep"), key=lambda p: p["latency_ms"])
        if sweep:
            ax.plot([p["latency_ms"] for p in sweep], [p["perplexity"] for p in sweep], marker=marker, ms=4,
                    ls=":", lw=1, color=colour, alpha=0.7)
        for p in mine:
            if p["kind"] == "original":
                ax.scatter(p["latency_ms"], p["perplexity"], s=60, marker=marker, facecolors="none",
                           edgecolors=[colour])
            elif p["kind"] == "compressed":
                ax.scatter(p["latency_ms"], p["perplexity"], s=70, marker=marker, color=colour,
                           edgecolors="black", linewidths=0.6, zorder=3)
                ax.annotate(f"k={p['blocks_removed']}", (p["latency_ms"], p["perplexity"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.scatter([], [], marker=marker, color=colour, label=row["label"])  # one legend entry per run
    front = merged.get("pareto", [])
    if front:
        ax.step([p["latency_ms"] for p in front], [p["perplexity"] for p in front], where="post", color="black",
                lw=1.2, alpha=0.8, label="Pareto front", zorder=2)
    values = [p["perplexity"] for p in points]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("workload latency (ms)")
    ax.set_ylabel(f"perplexity ({merged['eval']})" if merged.get("eval") else "perplexity (each run's first text)")
    ax.set_title("hollow: original, filled: compressed, dotted: sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _eval_names(report: dict) -> list[str]:
    compressed = report["perplexity"]["compressed"]
    names = [n for n in report["perplexity"]["original"] if n in compressed]
    return names or list(compressed)


def _strategy(report: dict) -> str | None:
    plan = report.get("plan")
    if isinstance(plan, dict) and plan.get("strategy"):
        return str(plan["strategy"])
    text = plan.get("summary") if isinstance(plan, dict) else plan
    if isinstance(text, str):
        match = re.match(r"\s*plan \(([^)]+)\)", text)
        if match:
            return match.group(1)
    strategy = (report.get("settings") or {}).get("strategy")
    return str(strategy) if strategy else None


def _run_row(report: dict, label: str, eval_name: str) -> dict:
    backend = report.get("backend") or {}
    settings = report.get("settings") or {}
    return {
        "label": label,
        "model": report.get("model"),
        "strategy": _strategy(report),
        "backend": backend.get("name") or settings.get("backend"),
        "device": backend.get("device") or settings.get("device"),
        "threads": backend.get("threads", settings.get("threads")),
        "blocks_original": report["blocks_original"],
        "blocks_removed_count": len(report["blocks_removed"]),
        "blocks_removed": list(report["blocks_removed"]),
        "blocks_linearized": list(report.get("blocks_linearized") or []),
        "target_speedup": report.get("target_speedup"),
        "max_ppl_increase": report.get("max_ppl_increase"),
        "speedup_measured": report.get("speedup_measured"),
        "target_met": report.get("target_met"),
        "eval": eval_name,
        "perplexity": {"original": dict(report["perplexity"]["original"]),
                       "compressed": dict(report["perplexity"]["compressed"])},
        "workload_latency_ms": {"original": report["workload_latency_ms"]["original"],
                                "compressed": report["workload_latency_ms"]["compressed"]},
        "sweep_points": len(report.get("sweep") or []),
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
    return f"{value:{spec}}{suffix}" if _number(value) else "-"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)
