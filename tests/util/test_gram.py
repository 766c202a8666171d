"""The one Gram accumulator against direct products over all the rows at once."""

import pytest
import torch

from compressor.util.gram import Gram

F64 = torch.float64


@pytest.mark.parametrize("d", [40, 300, 577])
def test_streamed_gram_equals_the_direct_product_even_when_read_between_batches(d):
    torch.manual_seed(d)
    x = torch.randn(120, d, dtype=F64)
    g = Gram(d)
    g.add(x[:50])
    torch.testing.assert_close(g.xtx, x[:50].T @ x[:50], rtol=1e-12, atol=1e-10)  # read mid-stream
    g.add(x[50:])
    torch.testing.assert_close(g.xtx, x.T @ x, rtol=1e-12, atol=1e-10)
    assert g.tokens == 120


def test_cross_products_and_output_energy():
    torch.manual_seed(0)
    x, y = torch.randn(64, 300), torch.randn(64, 7)
    g = Gram(300, 7)
    for a in range(0, 64, 16):
        g.add(x[a:a + 16], y[a:a + 16])
    x64, y64 = x.to(F64), y.to(F64)
    torch.testing.assert_close(g.xtx, x64.T @ x64, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(g.xty, x64.T @ y64, rtol=1e-12, atol=1e-10)
    assert g.yy == pytest.approx(float((y64 * y64).sum()), rel=1e-12)


@pytest.mark.parametrize("d", [64, 300])  # 300: the upper block triangle only, read after each batch
def test_diagonal_and_float32_products(d):
    torch.manual_seed(1)
    x = torch.randn(200, d) * 100  # large values: float32 products lose digits, float64 sums do not add more
    diag = Gram(d, diagonal=True, product_dtype=torch.float32)
    full = Gram(d, product_dtype=torch.float32)
    for a in (0, 100):
        diag.add(x[a:a + 100])
        full.add(x[a:a + 100])
        torch.testing.assert_close(full.xtx, x[:a + 100].to(F64).T @ x[:a + 100].to(F64), rtol=0,
                                   atol=1e-6 * float((x[:a + 100].to(F64) ** 2).sum(0).max()))
    x64 = x.to(F64)
    assert diag.xtx.shape == (d,)
    torch.testing.assert_close(diag.xtx, (x64 * x64).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(full.xtx, x64.T @ x64, rtol=0, atol=1e-6 * float((x64 * x64).sum(0).max()))
    assert full.xtx.dtype == F64
