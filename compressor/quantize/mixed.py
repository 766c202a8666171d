"""Mixed precision by measured sensitivity: which 4-bit MatMuls to keep at 8 bits.

Each MatMul's sensitivity is its relative output error on the calibration statistics,
sum_k E[x_k^2] ||w_k - dq_k||^2 / sum_k E[x_k^2] ||w_k||^2 (the diagonal of its input Hessian
weighting the rounding error of its 4-bit quantization; uniform weights without calibration). The
most sensitive ones move to 8 bits until they hold `fraction` of the 4-bit weights: a size budget,
spent where rounding hurts most, instead of a fixed rule (the builder's k_quant_mixed keeps the
qkv and down projections of chosen layers).
"""

from __future__ import annotations

import numpy as np


def sensitivity(weight: np.ndarray, dequantized: np.ndarray, importance: np.ndarray | None) -> float:
    """Relative output error of one [K, N] weight's quantization, inputs weighted by `importance` [K]."""
    imp = np.ones(weight.shape[0]) if importance is None else np.asarray(importance, np.float64)
    w = weight.astype(np.float64)
    err = imp @ np.square(w - dequantized).sum(1)
    return float(err / max(imp @ np.square(w).sum(1), 1e-30))


def most_sensitive(candidates: dict, weights: dict, quants: dict, hessians: dict, bits: dict,
                   fraction: float) -> dict[str, float]:
    """{MatMul name: sensitivity} of the 4-bit MatMuls to keep 8-bit: by decreasing sensitivity,
    as long as they fit in `fraction` of all 4-bit weights."""
    scores = {}
    for name, node in candidates.items():
        if bits[name] != 4:
            continue
        h = hessians.get(node.input[0])
        importance = None if h is None else (np.diagonal(h) if h.ndim == 2 else h)
        scores[name] = sensitivity(weights[name], quants[name].dequantize(), importance)
    budget = fraction * sum(weights[name].size for name in scores)
    chosen, used = {}, 0
    for name in sorted(scores, key=scores.get, reverse=True):
        if used + weights[name].size <= budget:
            chosen[name] = scores[name]
            used += weights[name].size
    return chosen
