"""report.md (for a pull request) and the one-line headline, read from a typed Report."""

from __future__ import annotations

from compressor.blocks import ranges_text
from compressor.report.figures import pareto_front, sweep_points
from compressor.report.schema import Report


def summary_rows(report: Report) -> list[tuple[str, str, str]]:
    """(metric, original, compressed) rows shared by the markdown and HTML reports."""
    rows = [("blocks", str(report.blocks_original), str(report.blocks_original - len(report.blocks_removed)))]
    if report.parameters:
        p = report.parameters
        rows.append(("parameters", f"{p.original:,}", f"{p.compressed:,}"))
    if report.size_bytes:
        s = report.size_bytes
        rows.append(("size on disk (MB)", f"{s.original / 1e6:.1f}", f"{s.compressed / 1e6:.1f}"))
    if report.latency:
        original, compressed = report.latency.original or {}, report.latency.compressed or {}
        for key, label in (("prefill", "prefill"), ("decode", "decode per token")):
            for a, b in zip(original.get(key, []), compressed.get(key, [])):
                shape = a.get("shape", "")
                for stat in ("p50_ms", "p90_ms"):
                    rows.append((f"{label} {shape} {stat}", f"{a[stat]:.2f}", f"{b[stat]:.2f}"))
                rows.append((f"{label} {shape} tokens/s", f"{a['tokens_per_s']:.1f}", f"{b['tokens_per_s']:.1f}"))
    w = report.workload_latency_ms
    rows.append(("workload latency (ms)", f"{w.original:.1f}", f"{w.compressed:.1f}"))
    for name, ppl in report.perplexity.original.items():
        new = report.perplexity.compressed.get(name)
        rows.append((f"perplexity ({name})", f"{ppl:.3f}", f"{new:.3f}" if new is not None else "-"))
    return rows


def headline(report: Report) -> str:
    parts = []
    if report.speedup_measured is not None:
        target = report.target_speedup
        goal = f" (target {target:.2f}x, {'met' if report.target_met else 'NOT met'})" if target else ""
        parts.append(f"speedup {report.speedup_measured:.3f}x{goal}")
    if report.perplexity_increase:
        parts.append(", ".join(f"perplexity {name} {v:+.1%}" for name, v in report.perplexity_increase.items()))
    removed = report.blocks_removed
    parts.append(f"{len(removed)} of {report.blocks_original} blocks removed ({ranges_text(removed)})")
    if report.blocks_linearized:
        parts.append("replaced by linear maps: " + ", ".join(
            ranges_text(range(s["start"], s["end"])) + (f" ({s['form']})" if s.get("form") else "")
            for s in report.blocks_linearized))
    return "; ".join(parts)


def to_markdown(report: Report) -> str:
    lines = [f"# compressor report: {report.model}", "", headline(report), "",
             "| metric | original | compressed |", "|---|---:|---:|"]
    lines += [f"| {m} | {a} | {b} |" for m, a, b in summary_rows(report)]
    b = report.backend
    if b.name:
        lines += ["", f"Measured on {b.name} / {b.device} ({b.threads or '?'} threads); workload: {report.workload}."]
    if report.notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in report.notes]
    lines += _sweep_lines(report)
    if report.artifacts:
        lines += ["", "Artifacts:"] + [f"- {k}: `{v}`" for k, v in report.artifacts.items()]
    return "\n".join(lines) + "\n"


def _sweep_lines(report: Report) -> list[str]:
    sweep = report.sweep or []
    if not sweep:
        return []
    names = list(sweep[0].perplexity)
    points = sweep_points(report)
    front = {id(p) for p in pareto_front(points)}
    lines = ["", "Sweep (training-free, each level measured against the original in alternation):", "",
             "| blocks removed | speedup | workload latency (ms) | " + " | ".join(f"perplexity ({n})" for n in names)
             + " | Pareto |", "|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for p, point in zip(sweep, points):
        ppl = " | ".join(f"{p.perplexity[n]:.3f}" for n in names)
        speedup = f"{p.speedup:.3f}x" if p.speedup is not None else "-"
        lines.append(f"| {p.blocks_removed} | {speedup} | {p.latency_ms:.1f} | {ppl} | "
                     f"{'yes' if id(point) in front else ''} |")
    return lines
