"""Metrics from Gram statistics against the direct formulas on stored matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from calibrate_refs import direct

from compressor.calibrate.metrics import angular_distance, anisotropy, linearities, linearity
from compressor.calibrate.stats import PairStats
from compressor.calibrate.twonn import twonn


def pair(x, y) -> PairStats:
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return PairStats(float(x.shape[0]), x.sum(0), y.sum(0), x.T @ x, x.T @ y, y.T @ y)


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("n,d", [(400, 16), (64, 32), (20, 32), (33, 32)])
def test_random_matches_direct(n, d):
    r = rng(n)
    x = r.normal(size=(n, d)) @ r.normal(size=(d, d)) + 3.0
    y = np.tanh(x @ r.normal(size=(d, d)) / 4) + 0.3 * r.normal(size=(n, d))
    assert linearity(pair(x, y)) == pytest.approx(direct(x, y), abs=1e-9)


def test_exactly_linear_is_one():
    r = rng(1)
    x = r.normal(size=(300, 24))
    y = x @ r.normal(size=(24, 24)) + 5.0
    assert linearity(pair(x, y)) == pytest.approx(1.0, abs=1e-10)


def test_independent_noise_is_about_d_over_n():
    r = rng(2)
    n, d = 4000, 40
    score = linearity(pair(r.normal(size=(n, d)), r.normal(size=(n, d))))
    assert score == pytest.approx(d / n, rel=0.25)
    assert score == pytest.approx(direct(r.normal(size=(n, d)), r.normal(size=(n, d))), abs=0.005)


def test_fewer_tokens_than_dims_and_rank_deficient():
    r = rng(3)
    x = r.normal(size=(10, 32))
    y = r.normal(size=(10, 32))
    assert linearity(pair(x, y)) == pytest.approx(direct(x, y), abs=1e-9)  # both 1: n - 1 < d
    low = r.normal(size=(200, 4)) @ r.normal(size=(4, 32))  # rank 4 in 32 dims
    y = np.sin(low @ r.normal(size=(32, 16))) + 0.1 * r.normal(size=(200, 16))
    assert linearity(pair(low, y)) == pytest.approx(direct(low, y), abs=1e-9)


def test_massive_channel_and_token():
    """A few huge values, as with massive activations, do not break the float64 solve."""
    r = rng(4)
    x = r.normal(size=(500, 32))
    x[:, 3] *= 300.0
    x[0] *= 150.0
    y = x + np.tanh(x @ r.normal(size=(32, 32)) / 40) * 0.5
    for a, b in [(x, y), (x, y - x)]:
        assert linearity(pair(a, b)) == pytest.approx(direct(a, b), abs=1e-8)


def test_invariant_to_scale_and_rotation():
    r = rng(5)
    x = r.normal(size=(300, 16))
    y = np.tanh(x @ r.normal(size=(16, 16)))
    q1, _ = np.linalg.qr(r.normal(size=(16, 16)))
    q2, _ = np.linalg.qr(r.normal(size=(16, 16)))
    base = linearity(pair(x, y))
    assert linearity(pair(7.0 * x, 0.01 * y)) == pytest.approx(base, abs=1e-10)
    assert linearity(pair(x @ q1, y @ q2)) == pytest.approx(base, abs=1e-10)


def test_without_residual_shares_the_solve():
    r = rng(6)
    x = r.normal(size=(300, 16))
    y = x + 0.3 * np.tanh(x @ r.normal(size=(16, 16)))
    with_res, without = linearities(pair(x, y))
    assert with_res == pytest.approx(direct(x, y), abs=1e-9)
    assert without == pytest.approx(direct(x, y - x), abs=1e-9)
    assert with_res > without
    residual = pair(x, y).residual()
    assert linearity(residual) == pytest.approx(without, abs=1e-12)


def test_degenerate_inputs_are_nan():
    assert math.isnan(linearity(pair(np.ones((1, 4)), np.ones((1, 4)))))
    assert math.isnan(linearity(pair(np.random.rand(5, 4), np.ones((5, 4)))))  # constant y


def test_anisotropy_matches_eigenvalues():
    r = rng(7)
    x = r.normal(size=(400, 12)) * np.arange(1, 13)
    cov = np.cov(x.T)
    expected = np.linalg.eigvalsh(cov)[-1] / np.trace(cov)
    assert anisotropy(pair(x, x)) == pytest.approx(expected, rel=1e-9)


def test_angular_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.0, 1.0, 0.25])


def test_twonn_recovers_known_dimensions():
    g = torch.Generator().manual_seed(0)
    for dim in (2, 5):
        flat = torch.randn(1500, dim, generator=g) @ torch.randn(dim, 40, generator=g)
        assert twonn(flat) == pytest.approx(dim, rel=0.2)
    assert math.isnan(twonn(torch.ones(10, 3)))  # all repeats: one point
