"""Local reconstruction (compressor.heal.local) on tiny pruned models: its stored inputs and targets are
the full forward's hidden states, its steps lower the error the full student measures, and only the
touched blocks change."""

from __future__ import annotations

import copy

import pytest
import torch
from heal_fixtures import pair, params, windows

from compressor.heal import HealConfig, heal
from compressor.heal.local import LOCAL_STEPS_PER_STEP, local_targets, reconstruct_
from compressor.surgery.edit import compressor_record

FAST = {"lr": 3e-3, "warmup": 2, "batch_size": 4, "log_every": 1, "autocast": False}


def states(model, ids):
    """h_0 (block 0's input) and every block's output, the final norm left out."""
    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return bare(input_ids=ids, output_hidden_states=True).hidden_states


def relative_error(s, t):
    return float((((s - t) ** 2).sum(-1) / (t ** 2).sum(-1)).mean())


@pytest.mark.parametrize("drop, reach, first, points", [
    ((2,), 1, 1, [(1, 2), (2, 3)]),   # kept 0 1 3: blocks 1 and 2 (originals 1 and 3) touch the cut
    ((0,), 1, 0, [(0, 1)]),           # kept 1 2 3: the first block was cut, its input is the embeddings
    ((2,), 2, 0, [(1, 2), (2, 3)]),  # two kept blocks before the cut, 0 and 1 (only 3 after it): 0 is free
])
def test_stored_inputs_and_targets_are_the_full_forwards_hidden_states(drop, reach, first, points):
    teacher, student = pair(drop=drop)
    ids = windows(n=6)
    got_first, got_points, inputs, targets = local_targets(student, teacher, ids, batch_size=4, reach=reach)
    assert got_first == first
    assert [(p.student_block, p.teacher_block) for p in got_points] == points
    hs_s, hs_t = states(student, ids), states(teacher, ids)
    torch.testing.assert_close(inputs.float(), hs_s[first], atol=0.02, rtol=0.01)  # stored in bf16
    for _, t in points:
        torch.testing.assert_close(targets[t].float(), hs_t[t + 1], atol=0.02, rtol=0.01)


def test_local_steps_lower_the_error_the_full_student_measures_and_touch_only_the_cut():
    teacher, student = pair(drop=(2,))  # the student's blocks 1 and 2 stand for teacher blocks 2 and 3
    ids = windows(n=16)
    hs_t = states(teacher, ids)

    def error():
        hs = states(student, ids)
        return relative_error(hs[2], hs_t[3]) + relative_error(hs[3], hs_t[4])

    before, start = error(), params(student)
    from compressor.heal.trainable import select_trainable_

    select_trainable_(student, "touched")
    summary = reconstruct_(student, teacher, ids, HealConfig(**FAST), seconds=None, steps=40)
    assert summary["steps"] == 40 and summary["windows"] == 16
    assert summary["error_last"] < summary["error_first"]
    assert error() < 0.7 * before
    changed = {k for k, v in params(student).items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in changed)


def test_heal_with_local_runs_it_first_then_distills():
    teacher, student = pair(drop=(2,))
    ids = windows()
    result = heal(student, teacher, ids, None, HealConfig(steps=6, local=0.5, **FAST))
    assert result.local["steps"] == 0.5 * 6 * LOCAL_STEPS_PER_STEP and result.steps == 6
    assert compressor_record(student)["removed"] == [2]
    assert HealConfig(local=0.5, train="all").problems() == [
        "--local trains the blocks next to the cuts alone: it needs --train touched"]
    assert "in [0, 1)" in HealConfig(local=1.0).problems()[0]
    assert HealConfig(reach=0).problems()[0].startswith("--reach is the number of kept blocks")


def test_a_budget_spent_on_the_targets_runs_no_local_step():
    teacher, student = pair(drop=(2,))
    from compressor.heal.trainable import select_trainable_

    select_trainable_(student, "touched")
    start = params(student)
    summary = reconstruct_(student, teacher, windows(), HealConfig(**FAST), seconds=1e-6, steps=0)
    assert summary["steps"] == 0 and summary["windows"] == 4  # one batch of targets, then the time is up
    assert all(torch.equal(v, start[k]) for k, v in params(student).items())


def test_steps_bound_the_local_phase_under_a_long_time_budget():
    """--steps and --max-minutes bound it whichever comes first, as they bound distillation."""
    teacher, student = pair(drop=(2,))
    result = heal(student, teacher, windows(), None, HealConfig(steps=2, max_minutes=30, local=0.5, **FAST))
    assert result.local["steps"] == 0.5 * 2 * LOCAL_STEPS_PER_STEP and result.local["seconds"] < 60
    assert result.steps == 2


def test_with_reach_2_the_blocks_around_the_cut_train_and_the_one_inside_a_run_is_free():
    """--reach 2 on kept 0 1 3: blocks 0, 1 and 2 train; the teacher is matched at the cut (block 1) and at
    the end of the run (block 2), not after block 0, which may change what it passes on."""
    teacher, student = pair(drop=(2,))
    from compressor.heal.trainable import select_trainable_

    names = select_trainable_(student, "touched", reach=2)
    assert {n.split(".")[2] for n in names} == {"0", "1", "2"}
    start = params(student)
    summary = reconstruct_(student, teacher, windows(n=16), HealConfig(reach=2, **FAST), seconds=None, steps=20)
    assert summary["error_last"] < summary["error_first"]
    changed = {k for k, v in params(student).items() if not torch.equal(v, start[k])}
    assert any(k.startswith("model.layers.0.") for k in changed)
    assert all(k.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.")) for k in changed)
