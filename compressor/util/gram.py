"""One streaming accumulator of Gram matrices in float64: calibration's hidden-state statistics, the
normal equations of a linear map, and the input Hessians of quantization all sum X'X this way.

    g = Gram(d)                 # or Gram(d_in, d_out) for X'Y too, Gram(d, diagonal=True) for diag(X'X)
    for x, y in batches:        # x [n, d_in], y [n, d_out]
        g.add(x, y)
    g.xtx, g.xty, g.yy, g.tokens

Memory is d x d whatever the number of tokens. Sums are float64. Products are float64 too unless
`product_dtype` says otherwise (quantization computes them in float32, the dominant cost there, and
only sums in float64). With d >= 256 only the upper block triangle of X'X is computed, about 40%
fewer flops than the full product; reading `xtx` fills in the lower part.
"""

from __future__ import annotations

import itertools

import torch

F64 = torch.float64
_PANELS = 4


class Gram:
    def __init__(self, d_in: int, d_out: int | None = None, *, diagonal: bool = False,
                 product_dtype: torch.dtype = F64, device=None):
        self.diagonal = diagonal
        self.product_dtype = product_dtype
        self._xtx = torch.zeros(d_in, dtype=F64, device=device) if diagonal else \
            torch.zeros(d_in, d_in, dtype=F64, device=device)
        self.xty = torch.zeros(d_in, d_out, dtype=F64, device=device) if d_out else None
        self.yy = 0.0
        self.tokens = 0
        self._lower_stale = False

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add the rows of x [n, d_in] (and of y [n, d_out], when X'Y is kept)."""
        x = x.to(self.product_dtype)
        if self.diagonal:
            self._xtx += (x * x).sum(0).to(F64)
        else:
            self._add_upper(x)
        if self.xty is not None:
            y = y.to(self.product_dtype)
            self.xty += (x.T @ y).to(F64)
            self.yy += float((y.to(F64) * y.to(F64)).sum())
        self.tokens += x.shape[0]

    def _add_upper(self, x: torch.Tensor) -> None:
        d = x.shape[1]
        if d < 256:
            if x.dtype != F64:
                self._xtx += (x.T @ x).to(F64)
            else:
                self._xtx.addmm_(x.T, x)
            return
        # Upper block triangle only: 10/16 of the products (and of float32 products' float64 sums).
        # float32 [1024, 1536] on one thread: 116-125 ms against 195-221 ms for the full product.
        edges = [round(k * d / _PANELS) for k in range(_PANELS + 1)]
        for a, b in itertools.pairwise(edges):
            if x.dtype != F64:
                self._xtx[a:b, a:] += (x[:, a:b].T @ x[:, a:]).to(F64)
            else:
                self._xtx[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        self._lower_stale = True

    @property
    def xtx(self) -> torch.Tensor:
        """X'X (float64 [d, d]), or its diagonal [d] for a diagonal Gram."""
        if self._lower_stale:
            d = self._xtx.shape[0]
            edges = [round(k * d / _PANELS) for k in range(_PANELS + 1)]
            for a, b in itertools.pairwise(edges):
                self._xtx[b:, a:b] = self._xtx[a:b, b:].T
            self._lower_stale = False
        return self._xtx

    @xtx.setter
    def xtx(self, value: torch.Tensor) -> None:
        self._xtx, self._lower_stale = value, False
