"""Mixed precision by measured sensitivity, checked against the relative error computed here."""

from types import SimpleNamespace

import numpy as np

from compressor.quantize import blockwise, mixed


def test_the_worst_rounded_weight_moves_to_8_bits_within_the_budget():
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (64, 32))
    codes[[0, 32]] = -8  # each block of 32 inputs holds -8 steps: the symmetric grid's step is then 0.01
    on_grid = (codes * 0.01).astype(np.float32)  # so that grid gives it back exactly
    weights = {"exact": on_grid, "normal": rng.standard_normal((64, 32)).astype(np.float32),
               "heavy": rng.standard_t(2, (64, 32)).astype(np.float32)}
    candidates = {name: SimpleNamespace(input=[f"x_{name}", name]) for name in weights}
    quants = {name: blockwise.rtn(w, 4, 32, "symmetric") for name, w in weights.items()}
    importance = rng.random(64) + 0.5
    hessians = {f"x_{name}": importance for name in weights}
    bits = dict.fromkeys(weights, 4)

    def relative(name):
        w = weights[name].astype(np.float64)
        err = ((w - quants[name].dequantize()) ** 2 * importance[:, None]).sum()
        return err / (w**2 * importance[:, None]).sum()

    chosen = mixed.most_sensitive(candidates, weights, quants, hessians, bits, fraction=0.4)  # room for one
    worst = max(weights, key=relative)
    assert list(chosen) == [worst] and worst != "exact"
    assert abs(chosen[worst] - relative(worst)) <= 1e-9 * relative(worst)
    assert relative("exact") < 1e-12
    assert mixed.most_sensitive(candidates, weights, quants, hessians, bits, fraction=0.0) == {}
    assert set(mixed.most_sensitive(candidates, weights, quants, hessians, bits, fraction=1.0)) == set(weights)
