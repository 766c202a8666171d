"""TwoNN intrinsic dimension (Facco et al., Sci. Rep. 2017), as used on transformer layers by
Ansuini et al. (NeurIPS 2019).

For each point, mu = r2 / r1 (distances to its second and first nearest neighbours) follows a
Pareto law with exponent d; d is the slope of -log(1 - F(mu)) against log(mu) through the origin,
fitted on the smallest 90% of the mu (the largest are noisy). Repeated points are merged first.
"""

from __future__ import annotations

import math

import torch


def twonn(points: torch.Tensor, fraction: float = 0.9) -> float:
    """Intrinsic dimension of the rows of `points` [N, d]; NaN when fewer than 3 distinct points."""
    # Repeated points (the same token at the embedding layer) would make neighbour ratios degenerate.
    x = torch.unique(points.to(torch.float64), dim=0)
    if x.shape[0] < 3:
        return math.nan
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(math.inf)
    r = dist.topk(2, dim=1, largest=False).values
    mu = (r[:, 1] / r[:, 0]).sort().values
    n = mu.numel()
    if n < 3:
        return math.nan
    keep = max(2, int(n * fraction))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    xs, ys = mu.log()[:keep], -torch.log1p(-empirical[:keep])
    denom = (xs * xs).sum()
    return float((xs * ys).sum() / denom) if denom > 0 else math.nan
