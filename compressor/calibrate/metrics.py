"""Metrics computed from sufficient statistics, never from stored activations.

Linearity score (Razzhigaev et al., arXiv 2405.12250): centre X and Y, scale each to unit Frobenius
norm, fit A by least squares, score = 1 - ||XA - Y||_F^2. The fitted XA is the projection of Y
onto the column space of X, so with Sxx, Sxy, Syy the centred Gram matrices

    score = tr(Sxy' Sxx^+ Sxy) / tr(Syy)

(scaling X does not move the projection; scaling Y is the division by tr(Syy)). The solve is in
float64 after a Jacobi scaling of Sxx (unit diagonal), which matters here: massive activations
make a few channels of X orders of magnitude larger than the rest. Eigenvalues below a relative
cutoff are treated as zero, which handles fewer tokens than dimensions and rank-deficient X.
"""

from __future__ import annotations

import contextlib
import math

import torch

from compressor.calibrate.stats import PairStats

F64 = torch.float64
# Eigenvalues of the unit-diagonal Gram below RCOND * largest are rounding noise, not signal.
RCOND = 1e-12


def linearity(pair: PairStats) -> float:
    """The paper's linearity score of y ~ x, from float64 Gram matrices."""
    if pair.n < 2:
        return math.nan
    sxx, sxy, syy = (m.to("cpu", F64) for m in pair.centered())
    total = torch.trace(syy)
    if total <= 0:
        return math.nan
    return float(_explained(sxx, sxy) / total)


def linearities(pair: PairStats) -> tuple[float, float]:
    """(score of y ~ x, score of (y - x) ~ x), sharing one factorization of Sxx."""
    if pair.n < 2:
        return math.nan, math.nan
    sxx, sxy, syy = (m.to("cpu", F64) for m in pair.centered())
    sxd, sdd = sxy - sxx, syy - sxy - sxy.T + sxx
    basis = _whitener(sxx)
    with_res = _project(basis, sxy) / torch.trace(syy)
    without = _project(basis, sxd) / torch.trace(sdd)
    return float(with_res), float(without)


def _explained(sxx: torch.Tensor, sxy: torch.Tensor) -> torch.Tensor:
    return _project(_whitener(sxx), sxy)


def _whitener(sxx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, W) with W' diag(scale) Sxx diag(scale) W = I on the numerical range of Sxx."""
    diag = torch.diagonal(sxx).clamp_min(0)
    live = diag > diag.max() * RCOND
    scale = torch.zeros_like(diag)
    scale[live] = diag[live].rsqrt()
    corr = sxx * scale[:, None] * scale[None, :]
    values, vectors = torch.linalg.eigh((corr + corr.T) / 2)
    keep = values > values.max() * RCOND
    return scale, vectors[:, keep] / values[keep].sqrt()



def _project(basis: tuple[torch.Tensor, torch.Tensor], sxy: torch.Tensor) -> torch.Tensor:
    """tr(Sxy' Sxx^+ Sxy) = ||W' D Sxy||_F^2 with (D, W) from `_whitener`."""
    scale, w = basis
    return (w.T @ (scale[:, None] * sxy)).square().sum()


def anisotropy(pair: PairStats) -> float:
    """Top eigenvalue of the covariance of x over its trace (1: all variance in one direction)."""
    sxx = pair.centered()[0].to("cpu", F64)
    total = torch.trace(sxx)
    if pair.n < 2 or total <= 0:
        return math.nan
    return float(torch.linalg.eigvalsh((sxx + sxx.T) / 2)[-1] / total)


@contextlib.contextmanager
def one_thread():
    """Run small dense factorizations single-threaded: for d ~ 1000 threads only add overhead, and
    on a busy machine multi-threaded LAPACK eigh was measured 50-200x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi along the last dimension (0: same direction, 1: opposite)."""
    cos = torch.nn.functional.cosine_similarity(a.to(F64), b.to(F64), dim=-1, eps=1e-30)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
