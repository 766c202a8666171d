"""heal() on a tiny pruned model: it learns, trains only what it should, resumes, and caches the teacher."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import types

import pytest
import torch
from heal_fixtures import pair, params, windows

from compressor.errors import CompressorError
from compressor.heal import HealConfig, heal, kd_loss
from compressor.heal import teacher_cache as tc
from compressor.heal.precision import cpu_computes_bf16
from compressor.heal.train import window_perplexity
from compressor.heal.trainable import cut_points, hidden_points, touched_blocks
from compressor.surgery.edit import compressor_record, save_checkpoint
from compressor.util.progress import use_tracker

# fp32 throughout: the exactness tests below compare runs with each other to 1e-5 or better.
FAST = {"lr": 3e-3, "warmup": 2, "batch_size": 4, "log_every": 1, "alpha": 1.0, "autocast": False}


@torch.no_grad()
def distillation_loss(student, teacher, ids):
    return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_touched_blocks_and_cut_points_follow_the_record():
    record = {"blocks_original": 10, "kept": [0, 1, 4, 5, 6, 9], "removed": [2, 3, 7, 8], "linearized": []}
    assert touched_blocks(record) == [1, 2, 4, 5]  # originals 1|4 around 2-3, 6|9 around 7-8
    assert [(p.student_block, p.teacher_block) for p in cut_points(record)] == [(1, 3), (4, 8)]
    assert touched_blocks({"blocks_original": 4, "kept": [2, 3], "removed": [0, 1]}) == [0]
    # reach 2: two kept blocks on each side of each cut, as many as there are
    assert touched_blocks(record, reach=2) == [0, 1, 2, 3, 4, 5]
    wide = {"blocks_original": 12, "kept": [0, 1, 2, 3, 6, 7, 8, 9, 10, 11], "removed": [4, 5]}
    assert touched_blocks(wide, reach=2) == [2, 3, 4, 5] and touched_blocks(wide, reach=3) == [1, 2, 3, 4, 5, 6]
    # After every kept block: its own original, or the last one removed before the next kept block.
    every = [(p.student_block, p.teacher_block) for p in hidden_points(record, "every")]
    assert every == [(0, 0), (1, 3), (2, 4), (3, 5), (4, 8), (5, 9)]
    assert hidden_points(record, "cuts") == cut_points(record)


def test_hidden_states_matched_after_every_kept_block_start_at_the_direct_formula():
    """The first logged hidden term is the mean, over kept blocks, of the per-token relative error
    |h_s - h_t|^2 / |h_t|^2 against the teacher block each one stands for, computed here from
    output_hidden_states with the final norm removed (so the last state is the last block's output)."""
    teacher, student = pair(drop=(1,))  # kept originals 0, 2, 3 of 4
    ids = windows(n=4)  # one batch: the first step sees every window
    bare_t, bare_s = copy.deepcopy(teacher), copy.deepcopy(student)
    bare_t.model.norm, bare_s.model.norm = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        hs_t = bare_t(input_ids=ids, output_hidden_states=True).hidden_states
        hs_s = bare_s(input_ids=ids, output_hidden_states=True).hidden_states
    errors = []
    for i, orig in enumerate([1, 2, 3]):  # student block i stands for teacher blocks up to `orig`
        s, t = hs_s[i + 1], hs_t[orig + 1]
        errors.append((((s - t) ** 2).sum(-1) / (t ** 2).sum(-1)).mean())
    expected = float(torch.stack(errors).mean())
    result = heal(student, teacher, ids, None, HealConfig(steps=1, hidden_weight=1.0, hidden_at="every",
                                                          train="all", **FAST))
    assert expected > 1e-3 and result.history[0]["hidden"] == pytest.approx(expected, rel=1e-3)


def test_norms_train_the_normalization_scales_only():
    teacher, student = pair(drop=(1,))
    ids = windows()
    before = distillation_loss(student, teacher, ids)
    start = params(student)
    heal(student, teacher, ids, None, HealConfig(steps=12, train="norms", **{**FAST, "lr": 3e-2}))
    changed = {k for k, v in params(student).items() if not torch.equal(v, start[k])}
    vectors = {k for k, v in start.items() if v.ndim == 1}
    assert changed == vectors and any(k.endswith("input_layernorm.weight") for k in changed)
    assert distillation_loss(student, teacher, ids) < before


def test_a_few_steps_lower_the_distillation_loss_and_touch_only_the_cut():
    teacher, student = pair(drop=(1,))
    ids = windows()
    before = distillation_loss(student, teacher, ids)
    start = params(student)
    result = heal(student, teacher, ids, ids[:4], HealConfig(steps=12, **FAST))
    assert distillation_loss(student, teacher, ids) < 0.8 * before
    assert result.steps == 12 and result.tokens == 12 * 4 * 16 and result.ppl_after is not None
    # Blocks 0 and 1 (originals 0 and 2) sit next to the cut; everything else is bit-identical.
    changed = {k for k, v in params(student).items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.1.")) for k in changed)
    assert not any(k.startswith("model.layers.2.") or "embed" in k or k == "model.norm.weight" for k in changed)
    assert compressor_record(student)["removed"] == [1]  # the record survives
    assert not student.training


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_bf16_autocast_on_cpu_trains_like_fp32():
    teacher, student = pair(drop=(1,))
    ids = windows()
    before = distillation_loss(student, teacher, ids)
    fp32, bf16 = copy.deepcopy(student), copy.deepcopy(student)
    r32 = heal(fp32, teacher, ids, ids[:4], HealConfig(steps=12, **FAST))
    r16 = heal(bf16, teacher, ids, ids[:4], HealConfig(steps=12, **{**FAST, "autocast": True}))
    assert (r32.precision, r16.precision) == ("float32", "bfloat16")
    # The first loss is the same model's forward in the two precisions; training lowers both alike.
    assert r16.history[0]["kd"] == pytest.approx(r32.history[0]["kd"], rel=0.05)
    assert distillation_loss(bf16, teacher, ids) < 0.8 * before
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # weights stay fp32
    # Evaluation on CPU stays fp32: the same weights give the same perplexity with autocast on or off.
    on, off = HealConfig(**{**FAST, "autocast": True}), HealConfig(**FAST)
    assert window_perplexity(bf16, ids[:4], config=on) == window_perplexity(bf16, ids[:4], config=off)


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_a_bf16_teacher_gives_nearly_the_fp32_targets_and_its_own_cache(tmp_path):
    teacher, _ = pair()
    ids = windows()
    fp32 = tc.LiveTeacher(teacher).targets(None, ids).logits
    bf16 = tc.LiveTeacher(teacher, dtype=torch.bfloat16).targets(None, ids).logits
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # it did run in bf16
    assert float(kd_loss(bf16, fp32)) < 1e-3  # KL(fp32 || bf16) of the next-token distributions
    paths = {tc.cache_path(tmp_path, teacher, ids, 8, 1.0, (), dtype) for dtype in (None, torch.bfloat16)}
    assert len(paths) == 2


def test_an_unpruned_student_has_nothing_touched_to_train():
    teacher, _ = pair()
    with pytest.raises(CompressorError, match="nothing 'touched'"):
        heal(copy.deepcopy(teacher), teacher, windows(), config=HealConfig(steps=1))


def test_resume_continues_the_same_schedule(tmp_path):
    teacher, student = pair(drop=(2,))
    ids = windows(n=12)
    config = HealConfig(steps=6, checkpoint_every=2, checkpoint_dir=tmp_path / "state", **FAST)

    whole = copy.deepcopy(student)
    heal(whole, teacher, ids, config=HealConfig(steps=6, **FAST))

    def interrupt_at_step_5(items, total, description):
        for i, item in enumerate(items):
            if description == "healing" and i == 4:
                raise KeyboardInterrupt
            yield item

    interrupted = copy.deepcopy(student)
    with use_tracker(interrupt_at_step_5), pytest.raises(KeyboardInterrupt):
        heal(interrupted, teacher, ids, config=config)
    resumed = copy.deepcopy(student)  # a fresh process would reload the pruned checkpoint
    config.resume = True
    result = heal(resumed, teacher, ids, config=config)
    assert result.resumed_from == 4 and result.steps == 6
    for k, v in params(whole).items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=1e-7, msg=k)

    other = HealConfig(**{**config.__dict__, "lr": 1e-2})
    with pytest.raises(CompressorError, match="other settings"):
        heal(copy.deepcopy(student), teacher, ids, config=other)


def test_teacher_cache_gives_the_live_teacher_loss_and_is_reused(tmp_path, monkeypatch):
    teacher, student = pair(drop=(1,))
    ids = windows(n=8)
    settings = dict(steps=4, train="all", temperature=2.0, hidden_weight=0.5, **FAST)
    live, cached = copy.deepcopy(student), copy.deepcopy(student)
    r_live = heal(live, teacher, ids, config=HealConfig(**settings))
    r_cache = heal(cached, teacher, ids, config=HealConfig(topk=128, teacher_cache=tmp_path, **settings))
    for a, b in zip(r_live.history, r_cache.history):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-5, abs=1e-6)  # top-k is exact at k = vocab
        assert a["hidden"] == pytest.approx(b["hidden"], rel=1e-2)  # hidden states are cached in bf16
    assert r_cache.teacher_cache and len(list(tmp_path.glob("teacher-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(tc, "build_cache", refuse)
    monkeypatch.setattr("compressor.heal.train.build_cache", refuse)
    again = heal(copy.deepcopy(student), lambda: teacher, ids,
                 config=HealConfig(topk=128, teacher_cache=tmp_path, **settings))
    assert again.history[0]["kd"] == r_cache.history[0]["kd"]


def test_teacher_of_another_width_is_refused():
    _, student = pair()
    wide, _ = pair()
    wide.model.embed_tokens = torch.nn.Embedding(128, 16)
    wide.lm_head = torch.nn.Linear(16, 99)
    with pytest.raises(CompressorError, match="vocabulary 99"):
        heal(student, wide, windows(), config=HealConfig(steps=1))


def test_time_bound_replans_the_schedule():
    teacher, student = pair()
    start = time.monotonic()
    result = heal(student, teacher, windows(), config=HealConfig(steps=100_000, max_minutes=0.1, **FAST))
    # Re-planned to end in time after the first steps were timed (or, on a crawling machine, cut short).
    assert result.planned_steps < 100_000 or result.stopped_by == "time"
    assert result.steps <= result.planned_steps
    assert time.monotonic() - start < 0.1 * 60 + 5


def test_slow_first_steps_do_not_shorten_the_schedule(monkeypatch):
    """On a clock the test drives (the real one made this depend on the machine's load): the first 3
    steps take 0.5 s each, the rest 0.1 s."""
    teacher, student = pair()
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr("compressor.heal.train.time", types.SimpleNamespace(monotonic=lambda: clock.now))

    def slow_start(items, total, description):
        for i, item in enumerate(items):
            if description == "healing":
                clock.now += 0.5 if i < 3 else 0.1
            yield item

    with use_tracker(slow_start):
        result = heal(student, teacher, windows(), config=HealConfig(steps=100_000, max_minutes=0.2, **FAST))
    # Fitted to the first 3 steps alone, 12 s would hold 3 + 0.97 x 10.5 / 0.5 = 23 steps; the second
    # re-plan, after 12 steps, times the steady pace: 12 + 0.97 x (12 - 2.4) / 0.1 = 105 steps.
    assert result.planned_steps == 105 and result.steps == 105 and result.stopped_by == "steps"


def test_lora_merges_into_a_plain_checkpoint(tmp_path):
    teacher, student = pair(drop=(1, 2))
    start = params(student)
    heal(student, teacher, windows(), config=HealConfig(steps=4, train="lora", lora_rank=4, **FAST))
    now = params(student)
    assert set(now) == set(start)  # no lora_A/lora_B left behind
    assert any(not torch.equal(now[k], start[k]) for k in now if ".layers." in k)
    save_checkpoint(student, None, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    # A process in which peft cannot even be imported loads it with plain transformers.
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(len(m.model.layers), m.config.compressor['removed'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "[1,", "2]"]


def test_a_time_bounded_cache_covers_a_subset_and_healing_uses_it(tmp_path):
    teacher, student = pair(drop=(1,))
    ids = windows(n=12)
    path = tc.cache_path(tmp_path, teacher, ids, 16, 1.0)
    tc.build_cache(teacher, ids, path, 16, 1.0, batch_size=4, deadline=0.0)  # past: one batch, then stop
    cached = tc.CachedTeacher(path)
    assert not cached.complete and len(cached.window_ids) == 4
    # a deadline visits windows in a seeded random order, so a partial cache is a random subset
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4]
    assert cached.window_ids.tolist() == expected.tolist() != [0, 1, 2, 3]
    with torch.no_grad():
        live = torch.log_softmax(teacher(input_ids=ids[cached.window_ids]).logits, -1).topk(16, dim=-1)
    torch.testing.assert_close(cached.targets(torch.arange(4), None).logprobs, live.values)
    result = heal(student, teacher, ids, config=HealConfig(steps=2, topk=16, teacher_cache=tmp_path, **FAST))
    assert result.tokens == 2 * 4 * 16


def test_the_teacher_cache_is_capped_least_recently_used_first_and_can_be_cleared(tmp_path, monkeypatch):
    """Each healing run on new windows adds a file; the folder stays under its cap by dropping the least
    recently used, never the one in use, and clear_cache empties it."""
    teacher, student = pair(drop=(1,))
    settings = dict(steps=1, train="all", topk=16, teacher_cache=tmp_path, **FAST)
    heal(copy.deepcopy(student), teacher, windows(n=4, seed=1), config=HealConfig(**settings))
    one = sorted(tmp_path.glob(tc.PATTERN))
    size = one[0].stat().st_size
    monkeypatch.setenv("COMPRESSOR_TEACHER_CACHE_GB", str(2.5 * size / 1e9))  # room for two files
    for seed in (2, 3):
        heal(copy.deepcopy(student), teacher, windows(n=4, seed=seed), config=HealConfig(**settings))
    kept = sorted(tmp_path.glob(tc.PATTERN))
    assert len(kept) == 2 and one[0] not in kept  # the oldest went first
    assert sum(f.stat().st_size for f in kept) <= 2.5 * size
    assert tc.clear_cache(tmp_path) == 2 and not list(tmp_path.glob(tc.PATTERN))
