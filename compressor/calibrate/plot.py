"""The profile figure, in the style of the paper's: linearity with and without the residual
stream against normalized depth, and below it how much each block adds."""

from __future__ import annotations

import math
from pathlib import Path

from compressor.calibrate.profile import Profile


def plot_profile(profile: Profile, path: Path | str) -> None:
    """Write a PNG of the profile, atomically (no display needed)."""
    from compressor.util.io import atomic_file

    with atomic_file(path) as tmp:
        profile_figure(profile).savefig(tmp, dpi=120, format="png")


def profile_figure(profile: Profile):
    """The profile as a matplotlib Figure on the Agg canvas.

    A bare `Figure` rather than pyplot: pyplot would need a backend, and forcing one
    (`matplotlib.use`) breaks plotting in the caller's notebook; nothing global is touched here.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = profile.blocks
    depth = [b.index / max(1, len(blocks) - 1) for b in blocks]
    fig = Figure(figsize=(7.5, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(depth, [b.linearity for b in blocks], "o-", color="tab:blue", ms=4, label="with residual")
    top.plot(depth, [b.linearity_without_residual for b in blocks], "s-", color="tab:red", ms=4,
             label="without residual")
    if any(b.outlier_tokens for b in blocks):
        top.plot(depth, [b.linearity_no_outliers for b in blocks], "--", color="tab:blue", alpha=0.6,
                 label="with residual, outlier tokens left out")
        top.plot(depth, [b.linearity_without_residual_no_outliers for b in blocks], "--", color="tab:red",
                 alpha=0.6, label="without residual, outlier tokens left out")
    top.set_ylabel("linearity score")
    values = [v for b in blocks for v in (b.linearity, b.linearity_without_residual, b.linearity_no_outliers,
                                          b.linearity_without_residual_no_outliers) if not math.isnan(v)]
    top.set_ylim(max(0.0, min(values, default=0.0) - 0.05), 1.01)
    top.grid(alpha=0.3)
    top.legend(loc="lower left", fontsize=8)
    top.set_title(f"{profile.model}: {profile.tokens:,} tokens, {len(blocks)} blocks", fontsize=10)

    bottom.plot(depth, [b.relative_contribution for b in blocks], "o-", color="tab:green", ms=4,
                label="relative contribution ||y-x||/||x||")
    bottom.plot(depth, [b.block_influence for b in blocks], "^-", color="tab:purple", ms=4,
                label="block influence 1-cos(x,y)")
    bottom.set_xlabel("normalized depth")
    bottom.set_ylabel("per token, mean")
    bottom.set_yscale("log")  # block 0 often adds 10x its input; the rest add a few percent
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
