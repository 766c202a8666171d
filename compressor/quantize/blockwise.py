"""Block-wise weight quantization and the MatMulNBits layout, as plain array functions.

A MatMul weight `w` is [K, N] (input rows, output columns). Blocks of `block_size` run along K,
one scale (and zero point) per output column and block. The grids follow ONNX Runtime's own
quantizer, so an "rtn" export is the same model the builder or `MatMulNBitsQuantizer` writes:

- symmetric: scale = m / -2**(bits-1) where m is the block's value of largest magnitude (so m itself
  lands exactly on the most negative code), q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1)-1),
  stored as q + 2**(bits-1);
- asymmetric: the range [min(w, 0), max(w, 0)] over 2**bits - 1 steps with an integer zero point.

Dequantized: (code - zero_point) * scale, so every weight is within scale/2 of its original,
except on the symmetric grid a weight of the opposite sign to m with |w| > (2**(bits-1) - 0.5)|scale|:
the grid has one code fewer on that side, so it clips, by at most one step (|w| <= |m|).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BlockQuant:
    """Integer codes of one weight in MatMulNBits order (before packing)."""

    codes: np.ndarray  # uint8 [N, n_blocks, block_size], 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None = symmetric (implicit 2**(bits-1))
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


def grid(blocks: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per block (last dim) for the ORT grid; zero point as a float tensor."""
    if symmetric:
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        m = blocks.gather(-1, idx).squeeze(-1)
        scale = m / -(2 ** (bits - 1))
        zp = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = blocks.min(dim=-1).values.clamp(max=0)
        hi = blocks.max(dim=-1).values.clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
        zp = torch.where(scale != 0, (-lo / torch.where(scale != 0, scale, 1)).round(), 0).clamp(0, 2**bits - 1)
    # An all-zero block: any scale works; 1 avoids dividing by zero and dequantizes to zeros.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zp


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes 0 .. 2**bits-1 of `x` on the grid (scale, zp), broadcast over the last dim of x."""
    return (x / scale + zp).round().clamp(0, 2**bits - 1)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuant:
    """Round-to-nearest block quantization of a [K, N] weight."""
    blocks = to_blocks(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), block_size)
    scale, zp = grid(blocks, bits, symmetric)
    codes = quantize_codes(blocks, scale[..., None], zp[..., None], bits)
    return _result(codes, scale, zp, bits, block_size, w.shape[0], symmetric)


def _result(codes, scale, zp, bits, block_size, k, symmetric) -> BlockQuant:
    return BlockQuant(
        codes=codes.to(torch.uint8).numpy(),
        scales=scale.to(torch.float32).numpy(),
        zero_points=None if symmetric else zp.to(torch.uint8).numpy(),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def gptq(
    w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool, damp: float = 0.01
) -> BlockQuant:
    """GPTQ (Frantar et al. 2022) on the ORT block grid: quantize input rows one at a time and push
    each row's error onto the rows not yet quantized, weighted by the inverse Hessian of the
    calibration inputs (H = sum x x^T over calibration tokens, [K, K]).

    Each block's grid is taken from the already-updated weights when its first row is reached, so
    the grid and the error feedback agree. `damp` times the mean diagonal is added to H so a
    nearly singular H (dead inputs, few tokens) stays invertible.
    """
    k, n = w.shape
    pad = (-k) % block_size
    wt = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)).double()  # [N, K]
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64)).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    wt[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    if pad:  # padded rows are zeros with no inputs: identity Hessian, quantized to exact zeros
        wt = torch.nn.functional.pad(wt, (0, pad))
        h = torch.block_diag(h, torch.eye(pad, dtype=h.dtype))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(wt)
    n_blocks = wt.shape[1] // block_size
    scales = torch.empty(n, n_blocks, dtype=wt.dtype)
    zps = torch.empty_like(scales)
    span = block_size * max(1, 128 // block_size)  # lazy-batch width (a whole number of blocks)
    for a in range(0, wt.shape[1], span):
        b = min(a + span, wt.shape[1])
        w1, err = wt[:, a:b].clone(), torch.zeros(n, b - a, dtype=wt.dtype)
        h1 = hinv[a:b, a:b]
        for i in range(b - a):
            col = a + i
            if col % block_size == 0:
                s, z = grid(w1[:, i : i + block_size], bits, symmetric)
                scales[:, col // block_size], zps[:, col // block_size] = s, z
            s, z = scales[:, col // block_size], zps[:, col // block_size]
            q = quantize_codes(w1[:, i], s, z, bits)
            codes[:, col] = q
            e = (w1[:, i] - (q - z) * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        wt[:, b:] -= err @ hinv[a:b, b:]
    codes = codes.reshape(n, n_blocks, block_size)
    return _result(codes, scales, zps, bits, block_size, k, symmetric)


def pack(q: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits initializers: B uint8 [N, n_blocks, block_size*bits/8], scales [N, n_blocks],
    zero points uint8 (4-bit: two per byte, low nibble first, [N, ceil(n_blocks/2)]; 8-bit: [N, n_blocks])."""
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
