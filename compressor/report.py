"""Run reports: report.json (everything, to reproduce), report.md (for a pull request) and
report.html (one self-contained file with its figures embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from compressor.io import write_json

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
    parts.append(f"{len(removed)} of {report['blocks_original']} blocks removed {removed}")
    if report.get("blocks_linearized"):
        parts.append(f"linear maps folded for spans {report['blocks_linearized']}")
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
    artifacts = report.get("artifacts", {})
    if artifacts:
        lines += ["", "Artifacts:"] + [f"- {k}: `{v}`" for k, v in artifacts.items()]
    return "\n".join(lines) + "\n"


def to_html(report: dict, figures: dict[str, bytes]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(m)}</td><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for m, a, b in
                   summary_rows(report))
    figs = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(title)}</figcaption></figure>" for title, png in figures.items())
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


def tradeoff_figure(report: dict) -> bytes | None:
    points = report.get("tradeoff", [])
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        ax.scatter(p["latency_ms"], p["perplexity"], s=40)
        ax.annotate(p["label"], (p["latency_ms"], p["perplexity"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("workload latency (ms)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity versus latency")
    ax.grid(alpha=0.3)
    return _png(fig)
