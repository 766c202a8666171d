"""The report figures as PNG bytes.

Drawn on a bare matplotlib `Figure` (no pyplot): the library never changes the process's matplotlib
backend, so plots in a user's notebook keep working after a report is written.
"""

from __future__ import annotations

import io

from compressor.report.schema import Report, is_finite


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates (lower `latency_ms` and `perplexity` are better), by latency.

    A point is dominated when another is no worse on both and better on one; equal points are all kept.
    Points with a missing or non-finite value are ignored.
    """
    usable = [p for p in points if is_finite(p.get("latency_ms")) and is_finite(p.get("perplexity"))]
    usable.sort(key=lambda p: (p["latency_ms"], p["perplexity"]))
    front: list[dict] = []
    best_before = float("inf")  # lowest perplexity among points strictly faster than the current group
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


def sweep_points(report: Report) -> list[dict]:
    """Sweep entries as figure points: perplexity on the first eval text, and latency on the baselines' axis (the
    final benchmark's original latency over the point's own measured speedup, as `pipeline.assemble` places the
    baselines), not the point's own timing round: the host drifts between rounds, and a sweep point with no block
    removed would otherwise sit apart from the quantize-only baseline it is."""
    original = report.workload_latency_ms.original if report.workload_latency_ms else None

    def latency(p) -> float | None:
        return original / p.speedup if original and p.speedup else p.latency_ms

    return [{"label": f"{p.precision} -{p.blocks_removed}" if p.precision != "fp32" else f"-{p.blocks_removed}",
             "latency_ms": latency(p), "perplexity": next(iter(p.perplexity.values()), float("nan"))}
            for p in report.sweep or []]


def baseline_points(report: Report) -> list[dict]:
    """The baselines and the choice as figure points (out-of-reach ones left out)."""
    name = next(iter(report.perplexity.original), None)
    labels = {"quantize-only": "{p} alone", "depth-only": "fp32 -{k} (depth only)", "chosen": "chosen: {p} -{k}"}
    return [{"label": labels.get(b.kind, b.kind).format(p=b.precision, k=b.blocks_removed), "kind": b.kind,
             "latency_ms": b.latency_ms, "perplexity": b.perplexity.get(name, float("nan"))}
            for b in report.baselines if b.latency_ms is not None and name in b.perplexity]


def figure(figsize):
    """A bare Figure and its axes (no pyplot, no global backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def profile_figure(profile: dict, report: Report) -> bytes:
    blocks = profile["blocks"]
    idx = [b["index"] for b in blocks]
    fig, ax = figure((8, 3.6))
    ax.plot(idx, [b["linearity"] for b in blocks], "o-", label="linearity (with residual)")
    ax.plot(idx, [b["linearity_without_residual"] for b in blocks], "s-", label="linearity without residual")
    ax.plot(idx, [b["block_influence"] for b in blocks], "^-", alpha=0.6, label="block influence")
    for span in report.blocks_linearized:
        ax.axvspan(span["start"] - 0.5, span["end"] - 0.5, color="orange", alpha=0.2)
    for i in report.blocks_removed:
        ax.axvline(i, color="red", alpha=0.35, lw=6)
    ax.set_xlabel("block")
    ax.set_ylabel("score")
    ax.set_title("removed blocks in red, linearized spans shaded")
    ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def tradeoff_figure(report: Report) -> bytes | None:
    baselines = baseline_points(report)
    points = [{"label": p.label, "latency_ms": p.latency_ms, "perplexity": p.perplexity} for p in report.tradeoff
              if not baselines or p.label == "pruned (before healing)"]
    points += baselines
    sweep = sweep_points(report)
    if not points and not sweep:
        return None
    fig, ax = figure((6, 4))
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
    if sweep or len(front) > 1:
        ax.legend(fontsize=8)
    for p in points:
        ax.scatter(p["latency_ms"], p["perplexity"], s=40)
        ax.annotate(p["label"], (p["latency_ms"], p["perplexity"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("workload latency (ms)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity versus latency")
    ax.grid(alpha=0.3)
    return png(fig)


def merged_figure(merged: dict) -> bytes | None:
    """Perplexity versus latency: each run in its own colour and marker, the Pareto front as a step line."""
    points = [p for p in merged.get("points", []) if is_finite(p["latency_ms"]) and is_finite(p["perplexity"])]
    if not points:
        return None
    fig, ax = figure((8, 5))
    import matplotlib

    markers = "osD^vPX*<>ph"
    colours = matplotlib.colormaps["tab10"].colors
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
    return png(fig)
