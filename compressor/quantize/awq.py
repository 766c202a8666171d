"""Activation-aware per-input-channel scales (AWQ, Lin et al. 2023), folded into the graph.

A MatMul computes x W = (x / s) (diag(s) W) for any s > 0 per input channel. Scaling the rows of
W up where the inputs are large gives those rows finer steps relative to their weight, at the cost
of coarser ones where inputs are small: the rounding error that reaches the output shrinks. The
1/s goes into whatever writes x, so the run-time graph is the same size and speed:
- a normalization (RMSNorm / LayerNorm and their Skip* fusions): its scale (and bias) divided by s;
- an element-wise Mul one of whose inputs is a weight MatMul's output (SwiGLU's up projection
  feeding down): that MatMul's output columns divided by s (exact: Mul is per channel).
Every MatMul reading x must take the same s, so they are scored together; a weight read by any
other node (a tied embedding) is left alone, and so is an input written by anything else. The
attention output (o's input) is not folded: v -> o through GroupQueryAttention (scales shared by
the query heads of one kv head) is exact but measured no better on SmolLM2 (+5.48% / +5.08% with
it, +5.49% / +4.84% without, wiki / bundled calibration), so that code was removed.

s = mean(x_k^2)^(alpha/2), normalized to a geometric middle of 1, with alpha chosen per input from
ALPHAS by the calibrated output error of 4-bit rounding, trace(D^T H D) with D = W - S^-1 Q(S W)
and H the (token-clipped) input Hessian: the error the scaled weights make on the calibration
tokens. alpha 0 is s = 1, so a fold never scores worse than none. The Hessians need no second
calibration pass: x / s has Hessian H / (s s^T), which is what the Hessian dict holds afterwards.
Mean squares come from the same clipped tokens, so a massive-activation token (SmolLM2's first)
weighs like a few typical ones there too. MatMuls kept 8-bit get the scales their 4-bit rounding
would choose: measured better than leaving them alone (SmolLM2, wiki calibration: +5.29% against
+5.49%).
"""

from __future__ import annotations

import numpy as np
import torch

from compressor.quantize import blockwise

ALPHAS = tuple(i / 8 for i in range(9))
COLUMNS = 256  # output columns that score a candidate alpha (at most about this many)
# op type -> (index of the scale input, index of the bias input or None)
NORMS = {
    "SimplifiedLayerNormalization": (1, None),
    "SkipSimplifiedLayerNormalization": (2, None),
    "RMSNormalization": (1, None),
    "LayerNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3),
}


def fold_scales_(graph, candidates: dict, hessians: dict, block_size: int, grid: str) -> dict[str, float]:
    """Fold AWQ scales into `graph`'s initializers and `hessians` (both in place) for every
    MatMul input that it can, scored on 4-bit rounding with block_size and grid. Returns {input
    tensor: alpha} of those that got scales (alpha > 0)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for out in graph.output:
        readers.setdefault(out.name, []).append(None)
    producer = {o: n for n in graph.node for o in n.output}
    matmul_of = {node.output[0]: node for node in candidates.values()}
    groups: dict[str, list] = {}
    for node in candidates.values():
        groups.setdefault(node.input[0], []).append(node)
    chosen = {}
    for x, nodes in groups.items():
        h = hessians.get(x)
        if h is None or np.ndim(h) != 2 or len(readers.get(x, [])) != len(nodes):
            continue  # something other than these MatMuls reads x
        if any(len(readers[n.input[1]]) != 1 for n in nodes):
            continue  # a shared weight (a tied embedding) cannot take scales of its own
        target = _fold_target(producer.get(x), inits, readers, matmul_of, h.shape[0])
        if target is None:
            continue
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        alpha, s = search(np.concatenate(ws, axis=1), h, 4, block_size, grid)
        if alpha == 0:
            continue
        for n, w in zip(nodes, ws, strict=True):
            _replace(graph, inits, n.input[1], w * s[:, None].astype(w.dtype))
        for name in target:  # a norm's [k] scale or bias, or an up projection's [K', k] weight
            t = numpy_helper.to_array(inits[name])
            _replace(graph, inits, name, t / s.astype(t.dtype))
        hessians[x] = h / np.outer(s, s)
        chosen[x] = alpha
    return chosen


def _fold_target(node, inits, readers, matmul_of, k) -> list[str] | None:
    """Initializers whose last axis, divided by s, makes the tensor `node` writes (output 0) come
    out divided by s; None when there is no such fold."""
    if node is None:
        return None

    def own_vector(name):  # a 1-D float initializer of length k that nothing else reads
        t = inits.get(name)
        return t is not None and list(t.dims) == [k] and len(readers[name]) == 1

    if node.op_type in NORMS and node.domain in ("", "ai.onnx", "com.microsoft"):
        scale, bias = NORMS[node.op_type]
        if scale >= len(node.input):
            return None
        names = [node.input[i] for i in (scale, bias) if i is not None and i < len(node.input) and node.input[i]]
        return names if all(own_vector(n) for n in names) else None
    if node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
        for inp in node.input:  # a weight MatMul's output, read by this Mul alone
            up = matmul_of.get(inp)
            w = inits.get(up.input[1]) if up is not None else None
            if w is not None and w.dims[-1] == k and len(readers[inp]) == 1 and len(readers[up.input[1]]) == 1:
                return [up.input[1]]  # its [K', k] weight: output columns on the last axis
    return None


def _replace(graph, inits, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    new = numpy_helper.from_array(np.ascontiguousarray(array), name)
    inits[name].CopyFrom(new)


def search(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, grid: str) -> tuple[float, np.ndarray]:
    """(alpha, s [K]) minimizing trace(D^T H D), D = W - S^-1 Q(S W), over ALPHAS; w [K, N], h [K, K]."""
    hf = torch.from_numpy(np.asarray(h, np.float64) / max(float(np.trace(h)), 1e-30)).float()
    # Output columns are rounded independently: an even sample of them scores every alpha alike, cheaper.
    wt = torch.from_numpy(np.asarray(w[:, :: max(1, w.shape[1] // COLUMNS)], np.float32))
    mean_sq = torch.from_numpy(np.array(np.diagonal(h), np.float64))
    live = mean_sq > 0
    if not bool(live.any()):
        return 0.0, np.ones(w.shape[0])
    base = mean_sq.clamp(min=float(mean_sq[live].min())).sqrt()
    best = (None, 0.0, torch.ones_like(base))
    for alpha in ALPHAS:
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()
        sf = s.float()[:, None]
        d = wt - _rtn(wt * sf, bits, block_size, grid) / sf
        err = float(((hf @ d) * d).sum())
        if best[0] is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2].numpy()


def _rtn(w: torch.Tensor, bits: int, block_size: int, grid: str) -> torch.Tensor:
    """Round to nearest on blockwise's grid, dequantized, [K, N] -> [K, N]."""
    k = w.shape[0]
    blocks = blockwise.to_blocks(w, block_size)
    scale, zp = blockwise.grid(blocks, bits, grid)
    codes = blockwise.quantize_codes(blocks, scale[..., None], zp[..., None], bits)
    dq = (codes - zp[..., None]) * scale[..., None]
    return dq.reshape(dq.shape[0], -1)[:, :k].T
