"""Latency statistics on injected timings, and the alternating measurement loop with fake trials."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.evaluate.latency import TimingConfig, measure, parse_decode, parse_prefill
from compressor.evaluate.stats import summarize


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101, 1000])
def test_summarize_matches_numpy(n):
    samples = np.random.default_rng(n).lognormal(3.0, 0.4, size=n)
    stats = summarize(list(samples), tokens=512)
    for q in (50, 90, 95, 99):
        assert getattr(stats, f"p{q}_ms") == pytest.approx(np.percentile(samples, q), rel=1e-12)
    assert stats.mean_ms == pytest.approx(samples.mean(), rel=1e-12)
    assert stats.std_ms == pytest.approx(samples.std(ddof=1) if n > 1 else 0.0, rel=1e-9, abs=1e-12)
    assert (stats.min_ms, stats.max_ms, stats.runs) == (samples.min(), samples.max(), n)
    assert stats.tokens_per_s == pytest.approx(512 * 1000 / samples.mean())


def test_summarize_order_does_not_matter_and_empty_is_an_error():
    assert summarize([3.0, 1.0, 2.0]) == summarize([1.0, 2.0, 3.0])
    with pytest.raises(CompressorError, match="no latency samples"):
        summarize([])


def test_measure_alternates_and_stops_when_runs_and_time_are_met():
    calls = []

    def trial(name, ms, per_call):
        def run(warmup):
            calls.append((name, warmup))
            return [ms] * per_call
        return run

    timing = TimingConfig(warmup=1, min_runs=4, min_seconds=0.05)  # 50 ms each
    a, b = measure([trial("a", 10.0, 1), trial("b", 30.0, 1)], timing)
    assert calls[:2] == [("a", True), ("b", True)]
    timed = [name for name, warmup in calls if not warmup]
    # b has its 4 runs (120 ms) after 4 rounds and stops; a needs a fifth sample of 10 ms to reach 50 ms
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a", "a"]
    assert (len(a), len(b)) == (5, 4)
    # a trial that yields many samples (decode) satisfies min_runs at once
    (c,) = measure([trial("c", 1.0, 64)], TimingConfig(warmup=0, min_runs=10, min_seconds=0.0))
    assert len(c) == 64


def test_a_slow_model_is_not_timed_for_as_long_as_a_fast_one_needs():
    calls = {"slow": 0, "fast": 0}

    def trial(name, ms):
        def run(warmup):
            calls[name] += 1
            return [ms]
        return run

    slow, fast = measure([trial("slow", 100.0), trial("fast", 1.0)], TimingConfig(warmup=0, min_runs=3, min_seconds=0.5))
    assert len(fast) == 500 and len(slow) == 5 and calls == {"slow": 5, "fast": 500}


def test_decoding_prefills_the_prompt_once_and_restarts_from_its_state():
    """Three passes over a 4-token continuation from one prefill. A torch cache grows in place, so each pass
    must start from a copy: every pass decodes the tokens that a fresh prefill of the prompt leads to."""
    from conftest import tiny_model

    from compressor.evaluate.backends import TorchBackend
    from compressor.evaluate.latency import DecodeSpec, decode_trial, random_tokens

    class Counting(TorchBackend):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prefills, self.tokens = 0, []

        def prefill(self, input_ids):
            self.prefills += 1
            return super().prefill(input_ids)

        def decode_step(self, state):
            cache, next_ids = super().decode_step(state)
            self.tokens.append(int(next_ids))
            return cache, next_ids

    backend = Counting(tiny_model("llama"), threads=1)
    state = backend.prefill(random_tokens(backend.vocab_size, 1, 12, seed=0))  # the reference: by hand
    for _ in range(4):
        state = backend.decode_step(state)
    expected, backend.tokens, backend.prefills = backend.tokens, [], 0
    run = decode_trial(backend, DecodeSpec(1, 12, 4), seed=0)
    samples = [ms for _ in range(12) for ms in run(False)]
    assert len(samples) == 12 and all(ms > 0 for ms in samples)
    assert backend.prefills == 1 and backend.tokens == expected * 3
    backend.close()


def test_parse_shapes():
    assert [(s.batch, s.seq) for s in parse_prefill("1x128, 4x512")] == [(1, 128), (4, 512)]
    assert [(s.batch, s.prompt, s.new_tokens) for s in parse_decode("128+64,2x16+8")] == [(1, 128, 64), (2, 16, 8)]
    assert parse_prefill("none") == [] and parse_decode("") == []
    for bad in ("128", "1x", "0x5", "ax3"):
        with pytest.raises(CompressorError, match="prefill"):
            parse_prefill(bad)
    with pytest.raises(CompressorError, match="decode"):
        parse_decode("128-64")
