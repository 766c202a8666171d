"""The latency model: fitting planted costs, predictions, limits, serialisation; measuring on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from compressor.blocks import spread_blocks
from compressor.errors import InvalidPlanError
from compressor.evaluate import LatencyModel, TimingConfig, Workload, fit_latency_model, measure_latency_model
from compressor.evaluate.latency_model import (
    fit_line,
    workload_latency_ms,
)
from compressor.surgery.edit import copy_without_blocks


def planted(fixed_prefill=120.0, per_block_prefill=18.0, fixed_decode=9.0, per_block_decode=0.9, noise=0.0):
    rng = torch.Generator().manual_seed(0)
    jitter = lambda: 1 + noise * (2 * torch.rand((), generator=rng).item() - 1)
    depths = (30, 23, 15)
    prefill = [(b, (fixed_prefill + per_block_prefill * b) * jitter()) for b in depths]
    decode = [(b, (fixed_decode + per_block_decode * b) * jitter()) for b in depths]
    return fit_latency_model(prefill, decode, blocks=30, workload=Workload(512, 128))


def test_fit_recovers_planted_costs():
    model = planted()
    assert model.prefill.fixed_ms == pytest.approx(120.0) and model.prefill.per_block_ms == pytest.approx(18.0)
    assert model.decode.fixed_ms == pytest.approx(9.0) and model.decode.per_block_ms == pytest.approx(0.9)
    assert model.fixed_ms == pytest.approx(120 + 128 * 9.0)
    assert model.per_block_ms == pytest.approx(18 + 128 * 0.9)
    assert model.prefill.max_relative_error() == pytest.approx(0.0, abs=1e-12)
    noisy = planted(noise=0.02)
    assert noisy.prefill.per_block_ms == pytest.approx(18.0, rel=0.15)


def test_predictions_and_ceiling():
    model = planted()
    full = workload_latency_ms(120 + 18 * 30, 9 + 0.9 * 30, 128)
    assert model.latency_ms(30) == pytest.approx(full)
    six = workload_latency_ms(120 + 18 * 24, 9 + 0.9 * 24, 128)
    assert model.predict_speedup(6) == pytest.approx(full / six)
    assert model.predict_speedup(0) == pytest.approx(1.0)
    assert model.ceiling() == pytest.approx(full / (120 + 128 * 9.0))
    k = model.blocks_for_speedup(1.2)
    assert model.predict_speedup(k) >= 1.2 > model.predict_speedup(k - 1)
    assert model.blocks_for_speedup(1.0) == 0
    with pytest.raises(InvalidPlanError, match="no pruning exceeds"):
        model.blocks_for_speedup(model.ceiling() + 0.1)
    with pytest.raises(InvalidPlanError):
        model.predict_speedup(30)


def test_round_trip_through_json():
    model = planted()
    data = json.loads(json.dumps(model.to_dict()))
    assert data["ceiling"] == pytest.approx(model.ceiling())
    assert LatencyModel.from_dict(data) == model


def test_fit_needs_two_depths():
    with pytest.raises(Exception, match="two depths"):
        fit_line([(30, 1.0), (30, 2.0)])


def test_spread_blocks_and_weight_sharing_copies():
    for n in (4, 30, 32):
        for k in range(1, n):
            picked = spread_blocks(n, k)
            assert len(set(picked)) == k and all(0 <= i < n for i in picked)
    model = tiny_model("llama")
    copy = copy_without_blocks(model, [1, 2])
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert copy.config.num_hidden_layers == 2 and len(copy.model.layers) == 2
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_measure_latency_model_on_a_tiny_model():
    model = tiny_model("llama")
    timing = TimingConfig(warmup=0, min_runs=2, min_seconds=0.0)
    result = measure_latency_model(model, Workload(16, 4), removals=(0, 2), timing=timing)
    assert result.blocks == 4 and [p[0] for p in result.prefill.points] == [4.0, 2.0]
    assert len(result.decode.points) == 2 and result.backend == "torch"
    assert LatencyModel.from_dict(result.to_dict()) == result
    assert len(model.model.layers) == 4  # the original is untouched
