"""`--threads` pins torch's process-wide thread count for the timed runs only: after a measurement it is
what it was before, so healing and exporting that follow keep every core (issue 22)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from compressor.evaluate import BenchConfig, TimingConfig, benchmark
from compressor.evaluate.backends import TorchBackend
from compressor.evaluate.latency_model import Workload, measure_latency_model

FAST = TimingConfig(warmup=0, min_runs=2, min_seconds=0.0, warmup_decode_tokens=2)
OUTSIDE = 3  # a count no test asks for, so a leaked pin shows


@pytest.fixture
def outside_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(OUTSIDE)
    yield OUTSIDE
    torch.set_num_threads(saved)


def threads_seen(model) -> list[int]:
    """The thread counts torch runs `model`'s forward passes with."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    return seen


def test_a_timing_with_one_thread_puts_the_count_back(outside_threads):
    model = tiny_model("llama")
    seen = threads_seen(model)
    backend = TorchBackend(model, threads=1)
    config = BenchConfig(prefill="1x8", decode="1x8+2", timing=FAST, perplexity=False)
    for _ in range(2):  # a backend kept for a second measurement (the pipeline's original) pins again
        seen.clear()
        (result,) = benchmark([backend], ["tiny"], config)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == outside_threads
        assert result.settings["threads"] == 1


def test_two_backends_in_alternation_put_back_the_count_found_before_both(outside_threads):
    a, b = TorchBackend(tiny_model("llama"), threads=1), TorchBackend(tiny_model("llama", seed=1), threads=1)
    benchmark([a, b], ["a", "b"], BenchConfig(prefill="1x8", decode="none", timing=FAST, perplexity=False))
    assert torch.get_num_threads() == outside_threads


def test_the_latency_model_puts_the_count_back(outside_threads):
    measure_latency_model(tiny_model("llama"), Workload(8, 2), removals=(0, 2), threads=1, timing=FAST)
    assert torch.get_num_threads() == outside_threads
