"""Block-wise weight quantization and the MatMulNBits layout, as plain array functions.

A MatMul weight `w` is [K, N] (input rows, output columns). Blocks of `block_size` run along K,
one scale (and zero point) per output column and block. The grids follow ONNX Runtime's own
quantizer, so an "rtn" export is the same model the builder or `MatMulNBitsQuantizer` writes:

- symmetric: scale = m / -2**(bits-1) where m is the block's value of largest magnitude (so m itself
  lands exactly on the most negative code), q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1)-1),
  stored as q + 2**(bits-1);
- asymmetric: the range [min(w, 0), max(w, 0)] over 2**bits - 1 steps with an integer zero point;
- "minmax" (asymmetric with a float zero point, MatMulNBits accepts one): the block's own range
  [min(w), max(w)] over 2**bits - 1 steps, q = round((w - min) / scale). This is llama.cpp's Q4_1
  grid, so a checkpoint that was dequantized from Q4_1 (SmolLM2's GGUF) is reproduced exactly.

Dequantized: (code - zero_point) * scale, so every weight is within scale/2 of its original,
except on the symmetric grid a weight of the opposite sign to m with |w| > (2**(bits-1) - 0.5)|scale|:
the grid has one code fewer on that side, so it clips, by at most one step (|w| <= |m|).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DAMP = 0.01  # GPTQ's usual dampening (fraction of the mean Hessian diagonal); QuantConfig.damp sets ours


@dataclass
class BlockQuant:
    """Integer codes of one weight in MatMulNBits order (before packing)."""

    codes: np.ndarray  # uint8 [N, n_blocks, block_size], 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 or float32 [N, n_blocks]; None = symmetric (implicit 2**(bits-1))
    bits: int
    block_size: int
    k: int  # rows of the original weight (K), before padding to whole blocks

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight this quantization stands for."""
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 2 ** (self.bits - 1))
        dq = (self.codes.astype(np.float32) - zp[..., None].astype(np.float32)) * self.scales[..., None]
        return dq.reshape(dq.shape[0], -1)[:, : self.k].T.copy()


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[K, N] -> [N, n_blocks, block_size], zero-padding K to whole blocks (as ORT does)."""
    k, n = w.shape
    pad = (-k) % block_size
    wt = w.T
    if pad:
        wt = torch.nn.functional.pad(wt, (0, pad))
    return wt.reshape(n, -1, block_size)


GRIDS = ("symmetric", "asymmetric", "minmax")


def grid(blocks: torch.Tensor, bits: int, symmetric: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per block (last dim); zero point as a float tensor.

    symmetric: True / "symmetric", False / "asymmetric" (ORT's grids), or "minmax" (float zero point)."""
    return grid_of(*block_range(blocks, symmetric), bits, symmetric)


def block_range(blocks: torch.Tensor, symmetric: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per block that the grid spans; symmetric: the value of largest magnitude, twice.
    Scaling both by f > 0 gives the range of the blocks scaled by f."""
    kind = _kind(symmetric)
    if kind == "symmetric":
        m = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return m, m
    lo, hi = torch.aminmax(blocks, dim=-1)
    return (lo.clamp(max=0), hi.clamp(min=0)) if kind == "asymmetric" else (lo, hi)


def grid_of(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """grid() from block_range()'s (lo, hi)."""
    kind = _kind(symmetric)
    if kind == "minmax":
        scale = (hi - lo) / (2**bits - 1)
        zp = torch.where(scale != 0, -lo / torch.where(scale != 0, scale, 1), 0)
        # An all-equal block: scale 1 with zero point -value puts every weight on code 0.
        zp = torch.where(scale == 0, -lo, zp)
        return torch.where(scale == 0, torch.ones_like(scale), scale), zp
    if kind == "symmetric":
        scale = lo / -(2 ** (bits - 1))
        zp = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (hi - lo) / (2**bits - 1)
        zp = torch.where(scale != 0, (-lo / torch.where(scale != 0, scale, 1)).round(), 0).clamp(0, 2**bits - 1)
    # An all-zero block: any scale works; 1 avoids dividing by zero and dequantizes to zeros.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zp


def _kind(symmetric: bool | str) -> str:
    if isinstance(symmetric, str):
        if symmetric not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, not {symmetric!r}")
        return symmetric
    return "symmetric" if symmetric else "asymmetric"


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes 0 .. 2**bits-1 of `x` on the grid (scale, zp), broadcast over the last dim of x."""
    return (x / scale + zp).round().clamp(0, 2**bits - 1)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool | str) -> BlockQuant:
    """Round-to-nearest block quantization of a [K, N] weight. ORT's own grids are quantized by
    ONNX Runtime's quantizer (its C++ kernels, what MatMulNBitsQuantizer and the builder run)."""
    kind = _kind(symmetric)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if kind != "minmax":
        return _ort_rtn(w, bits, block_size, kind == "symmetric")
    blocks = to_blocks(torch.from_numpy(w.copy()), block_size)  # a copy: the source may be read-only
    scale, zp = grid(blocks, bits, kind)
    codes = quantize_codes(blocks, scale[..., None], zp[..., None], bits)
    return _result(codes, scale, zp, bits, block_size, w.shape[0], kind)


def _ort_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuant:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, bits=bits))
    packed, scales, zp = quantizer.qbits_block_quant(w)
    n, blocks = scales.shape
    if bits == 4:
        codes = np.empty((n, blocks, block_size), np.uint8)
        codes[..., 0::2], codes[..., 1::2] = packed & 0xF, packed >> 4
        zp = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        codes = packed.reshape(n, blocks, block_size)
    return BlockQuant(codes=codes, scales=scales.astype(np.float32), zero_points=None if symmetric else zp.copy(),
                      bits=bits, block_size=block_size, k=w.shape[0])


def rtn_search(
    w: np.ndarray, importance: np.ndarray | None, bits: int, block_size: int, symmetric: bool | str,
    shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7),
) -> BlockQuant:
    """Round to nearest on a per-block clipped grid: each block's range is shrunk by the factor in
    `shrink` that minimises sum_k importance_k (w_k - dq_k)^2, the expected squared output error
    when input k has mean square importance_k (uniform when None). Clipping a rare large weight
    buys finer steps for the other 31. On the symmetric grid one wider range is tried too, the
    one whose codes are symmetric (largest magnitude on code +-(2**(bits-1) - 1), llama.cpp's Q8_0
    grid), so a checkpoint dequantized from Q8_0 is reproduced exactly. Ties keep the earlier
    factor: a block that the plain grid reproduces exactly stays on it."""
    if _kind(symmetric) == "symmetric":
        half = 2 ** (bits - 1)
        shrink = (*shrink, half / (half - 1))
    t = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the source may be read-only
    blocks = to_blocks(t, block_size)
    imp = torch.ones(w.shape[0]) if importance is None else torch.from_numpy(np.array(importance, np.float32))
    imp = to_blocks(imp[:, None], block_size)[0]  # [n_blocks, block_size]
    scales, zps = torch.empty(blocks.shape[:2]), torch.empty(blocks.shape[:2])
    rows = max(1, 2**20 // blocks[0].numel())  # output columns per chunk: a few MB stay in cache
    for a in range(0, blocks.shape[0], rows):
        chunk = blocks[a : a + rows]
        lo, hi = block_range(chunk, symmetric)
        best_err = None
        for f in shrink:
            scale, zp = grid_of(lo * f, hi * f, bits, symmetric)
            codes = quantize_codes(chunk, scale[..., None], zp[..., None], bits)
            err = (imp * (chunk - (codes - zp[..., None]) * scale[..., None]).square_()).sum(-1)
            if best_err is None:
                best_err, best_scale, best_zp = err, scale, zp
                continue
            take = err < best_err
            best_err = torch.where(take, err, best_err)
            best_scale, best_zp = torch.where(take, scale, best_scale), torch.where(take, zp, best_zp)
        scales[a : a + rows], zps[a : a + rows] = best_scale, best_zp
    codes = quantize_codes(blocks, scales[..., None], zps[..., None], bits)
    return _result(codes, scales, zps, bits, block_size, w.shape[0], symmetric)


def _result(codes, scale, zp, bits, block_size, k, symmetric) -> BlockQuant:
    kind = _kind(symmetric)
    return BlockQuant(
        codes=codes.to(torch.uint8).numpy(),
        scales=scale.to(torch.float32).numpy(),
        zero_points=(None if kind == "symmetric" else zp.to(torch.float32 if kind == "minmax" else torch.uint8).numpy()),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def gptq(
    w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool, damp: float | None = None,
    act_order: bool = False,
) -> BlockQuant:
    """GPTQ of one [K, N] weight with the [K, K] Hessian of its inputs (see gptq_many)."""
    return gptq_many([w], [hessian], bits, block_size, symmetric, damp, act_order)[0]


def gptq_many(
    ws: list[np.ndarray], hessians: list[np.ndarray], bits: int, block_size: int, symmetric: bool,
    damp: float | None = None, act_order: bool = False,
) -> list[BlockQuant]:
    """GPTQ (Frantar et al. 2022) on the ORT block grid: quantize input rows one at a time and push
    each row's error onto the rows not yet quantized, weighted by the inverse Hessian of the
    calibration inputs (H = sum x x^T over calibration tokens, [K, K]).

    Weights of one shape are done together as a batch (one Python loop over K for all 30 layers'
    gate projections, say): the loop is sequential in K, so batching is what makes it fast.
    Without act_order, rows go in input order and each block's grid is taken from the
    already-updated weights when its first row is reached, so the grid and the error feedback agree.
    act_order: rows go by decreasing Hessian diagonal (each weight of the batch its own order), so
    the inputs that carry the most energy are rounded while there is the most freedom left to
    compensate them; with "static groups": every block's grid is fixed beforehand from the original
    weights, so the blocks still run along the input dimension as MatMulNBits stores them. `damp`
    times the mean diagonal is added to H so a nearly singular H (dead inputs, few tokens) stays
    invertible.
    """
    damp = DAMP if damp is None else damp
    k, n = ws[0].shape
    pad = (-k) % block_size
    # Kept in the MatMul's own [K, N] orientation so that one input row is contiguous in memory.
    wk = torch.from_numpy(np.stack([np.asarray(w, dtype=np.float32) for w in ws]))  # [B, K, N]
    h = torch.from_numpy(np.stack([np.asarray(x, dtype=np.float64) for x in hessians]))
    idx = torch.arange(k)
    diag = h[:, idx, idx]
    dead = diag == 0
    h[:, idx, idx] = torch.where(dead, 1.0, diag) + damp * diag.mean(-1, keepdim=True)
    wk = wk * ~dead[:, :, None]
    if pad:  # padded rows are zeros with no inputs: identity Hessian, quantized to exact zeros
        wk = torch.nn.functional.pad(wk, (0, 0, 0, pad))
        h = torch.stack([torch.block_diag(x, torch.eye(pad, dtype=h.dtype)) for x in h])
    batch, kp = wk.shape[0], wk.shape[1]
    perm = None
    if act_order:
        # Static groups: [B, n_blocks, N] grids of the original blocks, before any error feedback.
        fixed = grid(wk.reshape(batch, kp // block_size, block_size, n).transpose(2, 3), bits, symmetric)
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        wk = wk.gather(1, perm[:, :, None].expand(-1, -1, n))
        h = h.gather(1, perm[:, :, None].expand(-1, -1, kp)).gather(2, perm[:, None, :].expand(-1, kp, -1))
    hinv = _upper_cholesky_of_inverse(h).float()
    codes = torch.empty_like(wk)
    scales = torch.empty(batch, kp // block_size, n)
    zps = torch.empty_like(scales)
    span = block_size  # lazy batch: rank-1 updates inside one span of rows, one matmul for the rest
    for a in range(0, kp, span):
        b = a + span
        w1, err = wk[:, a:b].clone(), torch.empty(batch, span, n)
        h1 = hinv[:, a:b, a:b]
        if perm is None:  # this block's grid, from its updated weights
            s, z = grid(w1.transpose(1, 2), bits, symmetric)  # [B, N]
            scales[:, a // block_size], zps[:, a // block_size] = s, z
            s, z = s[:, None].expand(-1, span, -1), z[:, None].expand(-1, span, -1)
        else:  # each row's grid is that of the block it came from
            at = (perm[:, a:b] // block_size)[:, :, None].expand(-1, -1, n)
            s, z = fixed[0].gather(1, at), fixed[1].gather(1, at)  # [B, span, N]
        for i in range(span):
            q = quantize_codes(w1[:, i], s[:, i], z[:, i], bits)
            codes[:, a + i] = q
            e = (w1[:, i] - (q - z[:, i]) * s[:, i]) / h1[:, i, i, None]
            w1[:, i:].baddbmm_(h1[:, i, i:, None], e[:, None, :], alpha=-1)
            err[:, i] = e
        if b < kp:
            wk[:, b:].baddbmm_(hinv[:, a:b, b:].transpose(1, 2), err, alpha=-1)
    if perm is not None:  # rows back in input order
        codes = torch.empty_like(codes).scatter_(1, perm[:, :, None].expand(-1, -1, n), codes)
        scales, zps = fixed
    # [B, K, N] -> per weight [N, n_blocks, block_size]; scales [B, n_blocks, N] -> [N, n_blocks]
    codes = codes.reshape(batch, kp // block_size, block_size, n).permute(0, 3, 1, 2)
    scales, zps = scales.transpose(1, 2), zps.transpose(1, 2)
    return [_result(codes[j], scales[j], zps[j], bits, block_size, k, symmetric) for j in range(batch)]


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = H^-1, from one factorization: with J the reversal
    permutation and J H J = M M^T, H^-1 = (J M^-T J)(J M^-1 J), so U = J M^-1 J."""
    m = torch.linalg.cholesky(h.flip(-1, -2))
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(m, eye, upper=False).flip(-1, -2)


def split(q: BlockQuant, widths: list[int]) -> list[BlockQuant]:
    """The quantizations of weights that were concatenated along N (they share one input)."""
    out, start = [], 0
    for w in widths:
        zp = None if q.zero_points is None else q.zero_points[start : start + w]
        out.append(BlockQuant(q.codes[start : start + w], q.scales[start : start + w], zp, q.bits, q.block_size, q.k))
        start += w
    return out


def pack(q: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits initializers: B uint8 [N, n_blocks, block_size*bits/8], scales [N, n_blocks],
    zero points uint8 (4-bit: two per byte, low nibble first, [N, ceil(n_blocks/2)]; 8-bit: [N, n_blocks])
    or float32 [N, n_blocks] as they are."""
    if q.zero_points is not None and q.zero_points.dtype != np.uint8:
        packed = q.codes if q.bits == 8 else q.codes[..., 0::2] | (q.codes[..., 1::2] << 4)
        return np.ascontiguousarray(packed, dtype=np.uint8), q.scales, np.ascontiguousarray(q.zero_points)
    if q.bits == 8:
        packed = q.codes
        zp = q.zero_points
    else:
        packed = q.codes[..., 0::2] | (q.codes[..., 1::2] << 4)
        zp = None
        if q.zero_points is not None:
            z = q.zero_points
            if z.shape[1] % 2:
                z = np.pad(z, ((0, 0), (0, 1)))
            zp = z[:, 0::2] | (z[:, 1::2] << 4)
    return np.ascontiguousarray(packed, dtype=np.uint8), q.scales, None if zp is None else np.ascontiguousarray(zp)
