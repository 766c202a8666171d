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
        verdict = report.target_verdict or ("met" if report.target_met else "missed")
        words = {"met": "met", "missed": "NOT met", "within the noise": "within the measured noise of it, not a miss"}
        goal = f" (target {target:.2f}x, {words.get(verdict, verdict)})" if target else ""
        spread = f" +-{report.speedup_spread * report.speedup_measured:.3f}" if report.speedup_spread else ""
        parts.append(f"speedup {report.speedup_measured:.3f}x{spread}{goal}")
    if report.perplexity_increase:
        parts.append(", ".join(f"perplexity {name} {v:+.1%}" for name, v in report.perplexity_increase.items()))
    removed = report.blocks_removed
    parts.append(f"{report.precision}, {len(removed)} of {report.blocks_original} blocks removed"
                 + (f" ({ranges_text(removed)})" if removed else ""))
    versus = versus_quantize_only(report)
    if versus:
        parts.append(versus)
    if report.blocks_linearized:
        parts.append("replaced by linear maps: " + ", ".join(
            ranges_text(range(s["start"], s["end"])) + (f" ({s['form']})" if s.get("form") else "")
            for s in report.blocks_linearized))
    return "; ".join(parts)


def versus_quantize_only(report: Report) -> str | None:
    """The choice against the fastest quantize-only point, in a reviewer's words."""
    chosen = next((b for b in report.baselines if b.kind == "chosen"), None)
    quantized = [b for b in report.baselines if b.kind == "quantize-only" and b.precision != "fp32" and b.speedup]
    if chosen is None or not quantized or not chosen.speedup:
        return None
    best = max(quantized, key=lambda b: b.speedup)
    if chosen.blocks_removed == 0 and not report.blocks_linearized:
        return f"{chosen.precision} alone: no block needed removing"
    name = next(iter(chosen.perplexity), None)
    if name is None or name not in best.perplexity:
        return None
    return (f"{chosen.speedup / best.speedup:.2f}x the speed of {best.precision} alone, at "
            f"{chosen.perplexity[name] / best.perplexity[name] - 1:+.1%} perplexity against it")


def baseline_rows(report: Report) -> list[list[str]]:
    """[what, precision, blocks removed, speedup, perplexity per text] of every baseline and the choice."""
    names = list(report.perplexity.original)
    rows = []
    for b in report.baselines:
        what = {"quantize-only": "quantize only", "depth-only": "depth only (training-free)",
                "chosen": "chosen (healed)" if b.healed else "chosen"}.get(b.kind, b.kind)
        speed = f"{b.speedup:.3f}x +-{(b.spread or 0) * b.speedup:.3f}" if b.speedup else "out of reach"
        blocks = "-" if b.blocks_removed is None else str(b.blocks_removed)
        ppl = [f"{b.perplexity[n]:.3f}" if n in b.perplexity else f">= {b.perplexity_at_least[n]:.3f}"
               if n in b.perplexity_at_least else "-" for n in names]
        rows.append([what, b.precision, blocks, speed, *ppl])
    return rows


def baseline_header(report: Report) -> list[str]:
    return ["point", "precision", "blocks removed", "speedup", *(f"perplexity ({n})" for n in report.perplexity.original)]


def to_markdown(report: Report) -> str:
    lines = [f"# compressor report: {report.model}", "", headline(report), "",
             "| metric | original | compressed |", "|---|---:|---:|"]
    lines += [f"| {m} | {a} | {b} |" for m, a, b in summary_rows(report)]
    b = report.backend
    if b.name:
        lines += ["", f"Measured on {b.name} / {b.device} ({b.threads or '?'} threads); workload: {report.workload}."]
    if report.baselines:
        header = baseline_header(report)
        lines += ["", ("Against quantizing alone and removing blocks alone (each speedup against the original fp32 "
                  "model, measured in alternation, with its spread):"), "",
                  "| " + " | ".join(header) + " |", "|---|---|---:|---:|" + "---:|" * (len(header) - 4)]
        lines += ["| " + " | ".join(row) + " |" for row in baseline_rows(report)]
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
             "| precision | blocks removed | speedup | workload latency (ms) | "
             + " | ".join(f"perplexity ({n})" for n in names) + " | Pareto |",
             "|---|---:|---:|---:|" + "---:|" * len(names) + "---|"]
    for p, point in zip(sweep, points):
        ppl = " | ".join(f"{p.perplexity[n]:.3f}" if n in p.perplexity else "-" for n in names)
        speedup = f"{p.speedup:.3f}x" if p.speedup is not None else "-"
        speedup += f" +-{p.spread * p.speedup:.3f}" if p.spread and p.speedup else ""
        latency = f"{p.latency_ms:.1f}" if p.latency_ms is not None else "-"
        lines.append(f"| {p.precision} | {p.blocks_removed} | {speedup} | {latency} | {ppl} | "
                     f"{'yes' if id(point) in front else ''} |")
    return lines
