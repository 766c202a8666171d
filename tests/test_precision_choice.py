"""Precision x depth: the choice rule on given measurements, and one run on ONNX Runtime where a test
seam makes one precision fast, so the choice must follow the measurement."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from compressor.errors import InvalidPlanError
from compressor.pipeline.precision import choose_for_target, choose_within_budget, undominated


def point(precision, speedup, ppl, spread=0.01):
    return {"precision": precision, "blocks_removed": 0, "speedup": speedup, "spread": spread, "perplexity": {"t": ppl}}


# SmolLM2-like measurements: int8 about 2x at +0.5%, int4 2.4x at +19%
POINTS = [point("fp32", 1.0, 17.58), point("int8", 2.0, 17.67), point("int4", 2.4, 20.90)]


def fake_run(target=None, precision="auto", budget=None):
    cfg = SimpleNamespace(target_speedup=target, max_ppl_increase=budget, speedup_margin=0.02, precision=precision,
                          backend="onnxruntime", device="cpu", format="onnx")
    return SimpleNamespace(cfg=cfg)


def depth_model(per_block=0.035, ppl_per_block=0.05):
    """A search and a training-free perplexity: each block removed saves `per_block` of the time and costs
    `ppl_per_block` perplexity (relative); the searches asked for are recorded."""
    asked = []

    def search(precision, at_most=None):
        asked.append(precision)
        fake.at_most[precision] = at_most
        base = next(p["speedup"] for p in fake.points if p["precision"] == precision)
        for k in range(1, 16):
            speedup = base / (1 - per_block * k)
            if at_most is not None and k > at_most:  # depth.blocks_for_target: one probe at at_most, short
                return {"k": None, "why": None, "beaten": "short", "attempts": [
                    {"blocks_removed": at_most, "measured": base / (1 - per_block * at_most), "spread": 0.01}]}
            if speedup >= fake.goal:
                return {"k": k, "why": None, "attempts": [{"blocks_removed": k, "measured": speedup, "spread": 0.01}]}
        return {"k": None, "why": f"{precision} out of reach", "attempts": [
            {"blocks_removed": 15, "measured": base / (1 - per_block * 15), "spread": 0.01}]}

    def depth_ppl(k):
        return {"t": 17.58 * (1 + ppl_per_block) ** k}

    fake = SimpleNamespace(search=search, depth_ppl=depth_ppl, asked=asked, goal=None, points=POINTS, at_most={})
    return fake


def choose(target, precision="auto", points=POINTS, **model):
    fake = depth_model(**model)
    fake.goal, fake.points = target * 1.02, points
    return choose_for_target(fake_run(target, precision), points, fake.depth_ppl, fake.search), fake.asked


def test_a_precision_that_meets_the_target_alone_removes_no_block():
    chosen, asked = choose(1.8)
    assert (chosen["precision"], chosen["blocks"]) == ("int8", 0)
    assert asked == ["fp32"]  # fp32 has the lower perplexity, so its depth was measured; int4 was not needed
    fp32 = next(c for c in chosen["candidates"] if c["precision"] == "fp32")
    assert fp32["blocks"] > 0 and fp32["estimate"]["t"] > chosen["estimate"]["t"]


def exhaustive(target, per_block=0.035, ppl_per_block=0.05, points=POINTS):
    """(precision, blocks, estimate) of every combination that reaches the target, each depth found by its own
    formula (depth_model's), none left out; the lowest estimate (then the fewest blocks) first."""
    out = []
    for p in points:
        ratio = p["perplexity"]["t"] / 17.58
        k = next((k for k in range(16) if p["speedup"] / (1 - per_block * k) >= target * 1.02), None)
        if k is not None:
            out.append((p["precision"], k, p["perplexity"]["t"] if k == 0 else 17.58 * (1 + ppl_per_block) ** k * ratio))
    return sorted(out, key=lambda c: (c[2], c[1]))


def test_beyond_every_precision_alone_the_lowest_estimated_perplexity_wins():
    chosen, asked = choose(3.0)
    assert asked == ["int4", "int8", "fp32"]  # the fastest first: it needs the fewest blocks
    assert (chosen["precision"], chosen["blocks"]) == exhaustive(3.0)[0][:2]
    # the estimate is the fp32 training-free perplexity of the depth times the precision's own ratio
    assert chosen["estimate"]["t"] == pytest.approx(exhaustive(3.0)[0][2])


class Scored:
    """A training-free perplexity that records the depths it scored, with TrainingFree's `beside` (one block
    past a depth, searched with it) where `lazy`."""

    def __init__(self, fn, lazy=False):
        self.fn, self.looked, self.lazy = fn, {}, lazy

    @property
    def scored(self):
        return sorted(self.looked)

    def beside(self, k):
        return k + 1 if self.lazy else None

    def __call__(self, k):
        self.looked.setdefault(k, self.fn(k))
        return self.looked[k]


@pytest.mark.parametrize("ppl_per_block", [0.2, 0.1, 0.0001])
def test_a_slower_precision_is_held_to_the_depths_at_which_it_could_still_win(ppl_per_block):
    """At 3x int4 needs 7 blocks, int8 10, and fp32 cannot reach it. int4 is searched and scored first; 8
    blocks, searched beside its 7, are scored too. At +20% a block, int8 with 8 blocks already scores above
    int4 with 7, so int8 could win only with 7 or fewer: one probe there (at_most 7) falls short, and 10 is
    never searched nor scored. At +10% a block 8 do not bound it: int8 is searched in full (10 blocks), and 9,
    one block deeper, is scored and bounds it. At +0.01% nothing bounds it, and 10 is scored.
    The choice is the exhaustive one either way."""
    fake = depth_model(ppl_per_block=ppl_per_block)
    fake.goal = 3.0 * 1.02
    scored = Scored(fake.depth_ppl, lazy=True)
    chosen = choose_for_target(fake_run(3.0), POINTS, scored, fake.search)
    assert (chosen["precision"], chosen["blocks"]) == exhaustive(3.0, ppl_per_block=ppl_per_block)[0][:2]
    assert fake.asked[0] == "int4" and fake.at_most["int4"] is None
    r8, r4 = 17.67 / 17.58, 20.90 / 17.58
    if 17.58 * (1 + ppl_per_block) ** 8 * r8 > 17.58 * (1 + ppl_per_block) ** 7 * r4:  # +20%
        assert fake.at_most["int8"] == 7 and scored.scored == [7, 8]
        int8 = next(t for t in chosen["tried"] if t["precision"] == "int8")
        assert not int8["reached"] and int8["beaten"] and not int8["why"]
    else:
        assert fake.at_most["int8"] is None and 9 in scored.scored  # one block deeper, before 10 outright
        int8 = next(c for c in chosen["candidates"] if c["precision"] == "int8")
        if 17.58 * (1 + ppl_per_block) ** 9 * r8 > 17.58 * (1 + ppl_per_block) ** 7 * r4:  # +10%
            assert int8["at_least"]["t"] == pytest.approx(17.58 * (1 + ppl_per_block) ** 9 * r8)
            assert 10 not in scored.scored
        else:
            assert int8["estimate"]["t"] == pytest.approx(17.58 * (1 + ppl_per_block) ** 10 * r8)
    fp32 = next(t for t in chosen["tried"] if t["precision"] == "fp32")  # 3x is beyond depth alone
    assert not fp32["reached"] and (fp32["why"] or fp32["beaten"])


@pytest.mark.parametrize("ppl_per_block", [0.2, 0.01])
def test_beside_a_precision_alone_one_block_bounds_the_slower_precisions(ppl_per_block):
    """At 2.1x int4 alone reaches it (2.4x, +19%); int8 (2.0x, +0.5%) needs blocks. One block removed is scored
    first: at +20% a block, int8 with one block already scores above int4 alone, so int8 is not searched at all;
    at +1% a block it could still win, and is searched in full. The choice is the exhaustive one either way."""
    fake = depth_model(ppl_per_block=ppl_per_block)
    fake.goal = 2.1 * 1.02
    scored = Scored(fake.depth_ppl, lazy=True)
    chosen = choose_for_target(fake_run(2.1), POINTS, scored, fake.search)
    assert (chosen["precision"], chosen["blocks"]) == exhaustive(2.1, ppl_per_block=ppl_per_block)[0][:2]
    assert 1 in scored.scored
    if 17.58 * (1 + ppl_per_block) * 17.67 / 17.58 > 20.90:
        assert "int8" not in fake.asked and chosen["precision"] == "int4" and chosen["blocks"] == 0
    else:
        assert "int8" in fake.asked and fake.at_most["int8"] is None


def test_a_deep_depth_is_bounded_one_block_deeper_at_a_time_instead_of_searched():
    """SmolLM2's demo at 1.8x: int4 alone 1.741x (+10.5%), int8 1.673x (+0.6%). int4 needs 2 blocks and int8 3,
    the best; fp32 needs 14, and the depths scored (2 and 3, no block searched beside them) do not bound it
    above int8's estimate. One block deeper does: 4 is scored, and 14 is never searched nor scored."""
    points = [point("fp32", 1.0, 17.58), point("int8", 1.673, 17.58 * 1.006), point("int4", 1.741, 17.58 * 1.105)]
    fake = depth_model(ppl_per_block=0.05)
    fake.goal, fake.points = 1.8 * 1.02, points
    scored = Scored(fake.depth_ppl)
    chosen = choose_for_target(fake_run(1.8), points, scored, fake.search)
    assert (chosen["precision"], chosen["blocks"]) == exhaustive(1.8, points=points)[0][:2] == ("int8", 3)
    fp32 = next(c for c in chosen["candidates"] if c["precision"] == "fp32")
    assert fp32["blocks"] == 14 and fp32["estimate"] == {}
    assert fp32["at_least"] == fake.depth_ppl(4) and fp32["at_least"]["t"] > chosen["estimate"]["t"]
    assert scored.scored == [2, 3, 4]


def test_a_lazy_training_free_search_takes_one_block_past_each_depth_asked_for():
    from compressor.pipeline.plan import TrainingFree

    lazy = TrainingFree(None, None, None, [4, 5], lazy=True)
    assert lazy.beside(4) == 5 and lazy.beside(5) is None and lazy.beside(0) == 1
    assert TrainingFree(None, None, None, [4, 5]).beside(4) is None


def test_a_slower_measurement_changes_the_choice():
    """The same qualities, int8 measured slower than int4: int4 (or depth) is chosen instead of int8."""
    slow_int8 = [point("fp32", 1.0, 17.58), point("int8", 1.1, 17.67), point("int4", 2.4, 17.60)]
    chosen, _ = choose(1.8, points=slow_int8)
    assert (chosen["precision"], chosen["blocks"]) == ("int4", 0)
    fast_int8 = [point("fp32", 1.0, 17.58), point("int8", 2.5, 17.59), point("int4", 2.4, 17.60)]
    chosen, _ = choose(1.8, points=fast_int8)
    assert (chosen["precision"], chosen["blocks"]) == ("int8", 0)


def test_a_pinned_precision_is_honoured():
    chosen, asked = choose(1.8, precision="int4")
    assert chosen["precision"] == "int4" and asked == []
    chosen, asked = choose(2.0, precision="fp32")
    assert chosen["precision"] == "fp32" and chosen["blocks"] > 0 and asked == ["fp32"]


def test_an_unreachable_target_names_the_best_measured_point():
    with pytest.raises(InvalidPlanError) as caught:
        choose(20.0)
    message = str(caught.value)
    best = max(2.4 / (1 - 0.035 * 15), 2.0 / (1 - 0.035 * 15))
    assert f"{best:.3f}x at int4 with 15 blocks removed" in message and "ask for less" in message


def test_dominated_precisions_are_left_out():
    points = [point("fp32", 1.0, 17.58), point("int8", 2.0, 17.67), point("int4", 1.9, 20.9)]
    assert [p["precision"] for p in undominated(points)] == ["fp32", "int8"]
    # slower by less than the larger spread (1.433 x 1.036 > 1.451): not beaten, both stay
    noisy = [point("fp32", 1.0, 14.24), point("int8", 1.451, 14.34, spread=0.033), point("int4", 1.433, 15.37, spread=0.036)]
    assert [p["precision"] for p in undominated(noisy)] == ["fp32", "int8", "int4"]
    clear = [point("fp32", 1.0, 14.24), point("int8", 1.55, 14.34, spread=0.033), point("int4", 1.433, 15.37, spread=0.036)]
    assert [p["precision"] for p in undominated(clear)] == ["fp32", "int8"]


def test_within_a_budget_the_fastest_combination_is_kept():
    curve = {0: {"t": 17.58}}  # no block fits the budget at fp32: only precisions can
    chosen = choose_within_budget(fake_run(budget=0.02), POINTS, curve)
    assert (chosen["precision"], chosen["blocks"]) == ("int8", 0)  # int4 is faster but +19%
    chosen = choose_within_budget(fake_run(budget=0.2), POINTS, curve)
    assert (chosen["precision"], chosen["blocks"]) == ("int4", 0)
    with pytest.raises(InvalidPlanError, match="allow a larger increase"):
        choose_within_budget(fake_run(budget=0.001), POINTS, curve)
    # blocks fit too: each precision goes as deep as its own ratio allows, and is timed there
    curve = {0: {"t": 17.58}, 1: {"t": 17.7}, 2: {"t": 17.9}, 3: {"t": 18.3}}
    timed = []

    def time_depth(precision, k):
        timed.append((precision, k))
        return SimpleNamespace(value=next(p["speedup"] for p in POINTS if p["precision"] == precision) * (1 + k / 10),
                               spread=0.01)

    chosen = choose_within_budget(fake_run(budget=0.025), POINTS, curve, time_depth)
    assert sorted(timed) == [("fp32", 2), ("int8", 2)]  # 17.67/17.58 x 17.9 is within 17.58 x 1.025
    assert (chosen["precision"], chosen["blocks"]) == ("int8", 2)


@pytest.fixture
def fast_int8(monkeypatch):
    """The test seam: every timing of an int8 model reads 10x faster than it ran."""
    from compressor.pipeline import measure

    monkeypatch.setattr(measure, "SLOWDOWN", {"int8": 0.1})


ORT_FAST = {"backend": "onnxruntime", "threads": 1, "prefill_tokens": 32, "new_tokens": 8, "samples": 8,
            "seq_len": 32, "timing_seconds": 0.2, "heal_steps": 2, "max_probes": 2}


def test_auto_follows_the_measurement_and_a_pinned_precision_is_honoured(tiny_dir, tmp_path, fast_int8, caplog):
    """ONNX Runtime, tiny model: int8 is made to measure 10x faster, and the target is beyond what depth
    alone reaches. Pinned int4 cannot reach it and ends with the best measured int4 point (the work kept);
    auto, resuming from that work, delivers int8 with no block removed, with its baselines."""
    import compressor

    out = tmp_path / "run"
    with pytest.raises(InvalidPlanError) as caught:
        compressor.compress(tiny_dir, target_speedup=5.0, out=out, precision="int4", **ORT_FAST)
    message = str(caught.value)
    assert "at int4 with" in message and "ask for less" in message and "int8" not in message
    assert not out.exists() and (tmp_path / ".run.work" / "precisions.stage.json").is_file()

    caplog.set_level(logging.INFO, logger="compressor")
    report = compressor.compress(tiny_dir, target_speedup=5.0, out=out, sweep=(0.0,), **ORT_FAST)
    assert "validating a copy of the int8 export" in caplog.text
    assert "precisions" not in report.seconds and "choice" in report.seconds  # resumed; only the choice is new
    assert (report.precision, report.blocks_removed) == ("int8", [])
    assert report.heal is None  # nothing removed, nothing to heal
    assert json.loads((out / "onnx" / "export.json").read_text())["precision"] == "int8"
    kinds = {(b.kind, b.precision) for b in report.baselines}
    assert kinds >= {("quantize-only", "fp32"), ("quantize-only", "int8"), ("quantize-only", "int4"),
                     ("depth-only", "fp32"), ("chosen", "int8")}
    depth_only = next(b for b in report.baselines if b.kind == "depth-only")
    assert depth_only.blocks_removed is None and "out of reach" in depth_only.note  # depth alone cannot reach 5x
    chosen = next(b for b in report.baselines if b.kind == "chosen")
    assert chosen.speedup >= 5 and chosen.spread > 0
    # the delivered export is the int8 quantize-only point's (validated, not quantized again): the
    # report's perplexity, that point's, is what the delivered folder scores through ONNX Runtime now
    export = json.loads((out / "onnx" / "export.json").read_text())
    assert export["validation"]["passed"] and export["quantization"]["config"]["bits"] == 8
    assert report.perplexity.compressed == pytest.approx(_scored_through_ort(out, report), rel=1e-5)
    assert report.perplexity.compressed != report.perplexity.original
    assert "int8 alone: no block needed removing" in (out / "report.md").read_text()
    assert "Against quantizing alone" in (out / "report.html").read_text()
    # --sweep 0 under a target: each precision's quantize-only point, as measured (it once crashed the report
    # at the very end: a quantize-only point also carries its copy with one block left)
    swept = {p.precision: p for p in report.sweep}
    assert set(swept) == {"fp32", "int8", "int4"} and {p.blocks_removed for p in report.sweep} == {0}
    for b in report.baselines:
        if b.kind == "quantize-only":
            assert swept[b.precision].speedup == b.speedup and swept[b.precision].perplexity == b.perplexity
    assert json.loads((out / "report.json").read_text())["baselines"][0]["kind"] == "quantize-only"


def _scored_through_ort(out, report) -> dict:
    """The delivered ONNX folder's perplexity through ONNX Runtime, on the run's evaluation texts."""
    from transformers import AutoTokenizer

    from compressor.evaluate import get_backend
    from compressor.pipeline import PipelineConfig
    from compressor.pipeline.data import load_data, perplexities

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    settings = {k: v for k, v in report.settings.items() if k in ("samples", "seq_len", "eval_max_tokens")}
    backend = get_backend("onnxruntime", out / "onnx", threads=1)
    try:
        return perplexities(backend, load_data(PipelineConfig(**settings), tokenizer).evaluation)
    finally:
        backend.close()


def test_heal_quantization_aware_trains_for_the_chosen_precision_and_the_export_follows(tiny_dir, tmp_path):
    """--heal-quantization-aware with int8 pinned: healing trains through the int8 fake quantizer, and the
    delivered export rounds on that grid (its integers are the trained ones: tests/heal). int8, because a
    random tiny model's near-uniform outputs fail int4's top-1 bound whatever the healing."""
    import compressor
    from compressor.quantize.fake import CONFIG_KEY

    out = tmp_path / "run"
    report = compressor.compress(tiny_dir, max_ppl_increase=100.0, out=out, precision="int8",
                                 heal_quantization_aware=True, **ORT_FAST)
    assert report.precision == "int8" and report.blocks_removed and report.heal is not None
    assert report.heal["quantization_aware"]["precision"] == "int8"
    assert json.loads((out / "model" / "config.json").read_text())[CONFIG_KEY]["bits"] == 8
    quantization = json.loads((out / "onnx" / "export.json").read_text())["quantization"]
    assert any("round to nearest on the trained grid" in n for n in quantization["notes"])


def test_a_precision_held_to_at_most_k_blocks_is_probed_there_first(monkeypatch):
    """depth._search with at_most, on a precision whose measured speedup is 1.2x / (1 - 0.03 k) (7 blocks reach
    1.5x): held to 6 blocks, one probe at 6 falls short and the search ends, "beaten"; held to 8 where the
    line (too pessimistic) asks for more, 8 is probed first, reaches, and the search goes on toward fewer,
    never deeper than 8; held to 9 where the line asks for fewer, the search is the unbounded one."""
    from compressor.pipeline import depth
    from compressor.pipeline.measure import Speedup

    probed = []

    def time_depth(run, precision, k, base, base_spread=0.0):
        probed.append(k)
        value = 1.2 / (1 - 0.03 * k)
        return Speedup(value, 0.01, [value], 100.0, 100.0 / value)

    monkeypatch.setattr(depth, "time_depth", time_depth)
    run = SimpleNamespace(cfg=SimpleNamespace(target_speedup=1.5, speedup_margin=0.0, max_probes=4), model=None)
    pessimistic = depth.DepthLine.through("int8", 30, 1.2, 3.0)
    assert pessimistic.fewest(1.5) > 8
    beaten = depth._search(run, pessimistic, at_most=6)
    assert probed == [6] and beaten["k"] is None and beaten["why"] is None and "6 blocks" in beaten["beaten"]
    probed.clear()
    found = depth._search(run, pessimistic, at_most=8)
    assert found["k"] == 7 and probed[0] == 8 and 7 in probed and max(probed) == 8
    probed.clear()
    exact = depth.DepthLine.through("int8", 30, 1.2, 1.2 / (1 - 0.03 * 29))
    assert exact.fewest(1.5) == 7
    assert depth._search(run, exact, at_most=9)["k"] == 7 and probed[0] == 7 and max(probed) <= 7


def test_a_rerun_takes_the_probe_timings_from_the_timing_cache_and_decides_alike(tiny_dir, tmp_path, fast_int8,
                                                                                  monkeypatch):
    """The timing cache (pipeline.timings): int8 measures 10x faster (the seam), so the first run delivers int8
    alone. Then the host "changes": every int8 timing reads 20x slower. A rerun takes every probe's speedup
    from the cache (the very same numbers) and makes the same choice, says so in its report, and measures
    its final benchmark afresh (which now misses the target); --fresh-timings measures the probes again and
    finds 5x out of reach."""
    import compressor
    from compressor.pipeline import measure

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    first = compressor.compress(tiny_dir, target_speedup=5.0, out=tmp_path / "a",
                                **{**ORT_FAST, "heal_steps": 0})
    assert (first.precision, first.blocks_removed, first.target_met) == ("int8", [], True)
    assert not any("timing cache" in n for n in first.notes) and first.timings_reused == []
    entries = sorted((tmp_path / "cache" / "timings").glob("*.json"))
    assert entries  # the probes' speedups, stored

    measured = measure.workload_ms
    monkeypatch.setattr(measure, "workload_ms", lambda r: measured(r) * (20.0 if r.timing.get("slowdown") else 1.0))
    second = compressor.compress(tiny_dir, target_speedup=5.0, out=tmp_path / "b", **{**ORT_FAST, "heal_steps": 0})
    assert (second.precision, second.blocks_removed) == ("int8", [])
    quantize_only = [(b.precision, b.speedup) for b in first.baselines if b.kind == "quantize-only"]
    assert [(b.precision, b.speedup) for b in second.baselines if b.kind == "quantize-only"] == quantize_only
    assert any("came from the timing cache" in n and "int8, int4 alone" in n for n in second.notes)
    stored = json.loads((tmp_path / "b" / "report.json").read_text())["timings_reused"]
    assert any(t["probe"].startswith("int8, int4 alone") for t in stored)
    assert len(stored) == len(second.timings_reused) == len(entries)
    assert second.speedup_measured < 1 and not second.target_met  # the final benchmark is not cached
    assert sorted((tmp_path / "cache" / "timings").glob("*.json")) == entries

    with pytest.raises(InvalidPlanError, match="was not reached"):
        compressor.compress(tiny_dir, target_speedup=5.0, out=tmp_path / "c", fresh_timings=True,
                            **{**ORT_FAST, "heal_steps": 0})


def tiny_ort_run(tmp_path, target=1.2):
    """A Run on a tiny four-block Llama (head size 16: the builder's route), timed on ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from conftest import make_tokenizer, tiny_model

    from compressor.pipeline import PipelineConfig
    from compressor.pipeline.runner import Run, Runner

    cfg = PipelineConfig(target_speedup=target, **{k: v for k, v in ORT_FAST.items() if k not in ("samples", "seq_len")})
    return Run(cfg, Runner(tmp_path / "work"), tiny_model("llama", head_dim=16, num_hidden_layers=4), make_tokenizer())


def test_precisions_are_timed_together_and_measured_again_together(tmp_path, fast_int8, monkeypatch):
    """measure_together: int8 (made to read 10x faster, the seam) and int4 share each round's timing of the
    original; with every speedup "within the noise" of the target (a band wide enough for any timing of a
    tiny model), the group is measured again, for both, three rounds in all."""
    from compressor.pipeline import measure
    from compressor.pipeline.measure import backend_for, measure_together

    run = tiny_ort_run(tmp_path)
    try:
        original = backend_for(run, run.model, "probe-original")
        models = {p: backend_for(run, run.model, f"probe-{p}-0", p) for p in ("int8", "int4")}
        once = measure_together(run, original, models)
        assert once["int8"].original_ms == once["int4"].original_ms  # one alternation: the original timed once
        assert once["int8"].value > 4 * once["int4"].value and len(once["int4"].rounds) == 1
        monkeypatch.setattr(measure, "REMEASURE_BAND", 100.0)
        again = measure_together(run, original, models, target=once["int8"].value)
    finally:
        run.close_backends()
    assert len(again["int8"].rounds) == len(again["int4"].rounds) == 3
    for speed in again.values():
        assert speed.rounds == sorted(speed.rounds) and speed.value == speed.rounds[1]  # each its own median round
        assert speed.spread >= (speed.rounds[-1] - speed.rounds[0]) / 2 / speed.value - 1e-12


def test_a_depth_probe_is_timed_against_the_unpruned_model_at_its_own_precision(tmp_path, fast_int8, monkeypatch):
    """ONNX Runtime, tiny model, int8 made to read 10x faster than it runs (the seam). A depth probe at int8 is
    timed against the unpruned int8 model, so the seam cancels in its ratio: its speedup is that ratio times
    the base it is given (here 2x), not the seam's 10x; the ratio is measured once (a second call takes it
    from the timing cache) and its rounds and spread carry the base's."""
    from compressor.pipeline.depth import time_depth

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    run = tiny_ort_run(tmp_path)
    try:
        speed = time_depth(run, "int8", 2, base=2.0, base_spread=0.03)
    finally:
        run.close_backends()
    assert 1.0 < speed.value < 2.0 * 3  # two of four blocks removed: at most 2x the unpruned int8 model's speed
    assert speed.spread >= 0.03 and speed.rounds == pytest.approx([speed.value])  # no target: one round
    assert (tmp_path / "work" / "probe-int8-0-rtn" / "export.json").is_file()  # the reference: unpruned, int8
    entries = list((tmp_path / "cache" / "timings").glob("*.json"))
    assert len(entries) == 1 and '"against": "unpruned"' in entries[0].read_text()
    again = time_depth(run, "int8", 2, base=4.0)  # the cached ratio, scaled by another base: nothing is timed
    assert again.value == pytest.approx(speed.value * 2.0) and len(run.reused_timings) == 1


def test_the_depth_only_baseline_is_bounded_where_its_plan_was_never_searched():
    """A depth-only (fp32) depth deeper than every plan searched gets the lower bound of the deepest one scored
    (a deeper plan scores no better), not a search of its own; one among the depths searched is scored."""
    from compressor.pipeline.plan import _depth_only

    ppl = {0: 10.0, 6: 20.0, 7: 21.0}

    class Depths:
        def __init__(self):
            self.batches, self.scored = {6: (6, 7), 7: (6, 7)}, [0, 6, 7]

        def __call__(self, k):
            assert k in ppl, f"the plan for {k} blocks was searched"
            return {"t": ppl[k]}

    search = {"k": 15, "speedup": 1.8, "spread": 0.05}
    bounded = _depth_only(search, Depths(), {"estimate": {"t": 21.2}, "candidates": []})
    assert bounded["estimate"] == {} and bounded["at_least"] == {"t": 21.0} and bounded["blocks"] == 15
    scored = _depth_only({**search, "k": 7}, Depths(), {"estimate": {"t": 30.0}, "candidates": []})
    assert scored["estimate"] == {"t": 21.0} and "at_least" not in scored
