"""Starting the student's forwards at its first touched block (compressor.heal.segment): distillation
computes the full forward's loss and gradients, and with a teacher cache, local reconstruction reads the
cache, so the teacher runs once over the training windows."""

from __future__ import annotations

import pytest
import torch
from heal_fixtures import pair, params, windows

from compressor.adapters import get_adapter
from compressor.heal import HealConfig, heal
from compressor.heal.distributed import Runtime
from compressor.heal.local import local_cache_blocks
from compressor.heal.segment import prefix_skippable
from compressor.heal.teacher_cache import CachedTeacher, LiveTeacher
from compressor.heal.train import _losses
from compressor.heal.trainable import hidden_points, select_trainable_
from compressor.surgery.edit import compressor_record

FAST = {"lr": 3e-3, "warmup": 2, "batch_size": 4, "log_every": 1, "autocast": False}


def test_distillation_started_at_the_first_touched_block_gives_the_full_forwards_loss_and_gradients(arch):
    teacher, student = pair(arch, drop=(2,))  # kept 0 1 3: blocks 1 and 2 train, block 0 is the teacher's
    select_trainable_(student, "touched")
    config, runtime = HealConfig(hidden_weight=0.5, **FAST), Runtime(torch.device("cpu"))
    first = prefix_skippable(student, config, runtime)
    assert first == 1
    points = hidden_points(compressor_record(student), "cuts")
    live = LiveTeacher(teacher, [p.teacher_block for p in points] + [first - 1])
    ids = windows(n=4)

    def loss_and_grads(start: int):
        student.zero_grad(set_to_none=True)
        parts = _losses(student, student, live, torch.arange(4), ids, points, None, config, runtime, start)
        parts["loss"].backward()
        return parts, {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    (full, full_grads), (started, started_grads) = loss_and_grads(0), loss_and_grads(first)
    for term in ("kd", "lm", "hidden"):
        torch.testing.assert_close(started[term], full[term], rtol=1e-4, atol=1e-5)
    assert full_grads.keys() == started_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(started_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert len(get_adapter(student).blocks_of(student)) == 3  # every block is back after the forward


def test_distillation_runs_the_prefix_where_it_is_not_the_teachers():
    student = pair(drop=(2,))[1]
    runtime = Runtime(torch.device("cpu"))
    assert prefix_skippable(student, HealConfig(quantization_aware="int8"), runtime) == 0  # prefix fake-quantized
    assert prefix_skippable(student, HealConfig(train="all"), runtime) == 0
    assert prefix_skippable(student, HealConfig(regularize_linearity=0.1), runtime) == 0  # it reads every block
    assert prefix_skippable(pair(drop=(0,))[1], HealConfig(), runtime) == 0  # block 0 trains
    assert prefix_skippable(student, HealConfig(reach=2), runtime) == 0  # reach 2 trains block 0 too


def states(model, ids):
    """h_0 (block 0's input) and every block's output, the final norm left out."""
    import copy

    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return bare(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("drop, blocks", [
    ((2,), [0, 2, 3]),  # the segment's input (block 0's output) and the teacher at the cut and after it
    ((0,), [1]),        # block 0 was cut: the segment starts at the embeddings, matched after teacher block 1
])
def test_with_a_teacher_cache_local_reconstruction_reads_it_and_the_teacher_runs_once(tmp_path, drop, blocks):
    teacher, student = pair(drop=drop)
    ids = windows(n=12)
    forwards = []
    teacher.register_forward_hook(lambda *args: forwards.append(1))
    config = HealConfig(steps=4, local=0.5, teacher_cache=tmp_path, **FAST)
    assert local_cache_blocks(student, config) == blocks
    start = params(student)
    result = heal(student, teacher, ids, None, config)
    assert len(forwards) == 3  # 12 windows in batches of 4: the cache's pass, and no other
    assert result.local["windows"] == 12 and result.local["steps"] == 0.5 * 4 * 10 and result.steps == 4
    assert result.local["error_last"] < result.local["error_first"]
    changed = {k for k, v in params(student).items() if not torch.equal(v, start[k])}
    trained = ("model.layers.1.", "model.layers.2.") if drop == (2,) else ("model.layers.0.",)
    assert changed and all(k.startswith(trained) for k in changed)
    cache, hs = CachedTeacher(result.teacher_cache), states(teacher, ids)
    for b in blocks:  # what local reconstruction read: the teacher's block outputs, stored in bf16
        torch.testing.assert_close(cache.hidden_rows(b, torch.arange(12)).float(), hs[b + 1], atol=0.02, rtol=0.01)


def test_a_resumed_run_reuses_the_cache_and_ends_where_one_uninterrupted_run_does(tmp_path):
    """The resumed run skips local reconstruction (its result is in the saved state) yet asks the cache for
    the same blocks: it reuses the interrupted run's cache, and the teacher does not run again."""
    import copy

    from compressor.util.progress import use_tracker

    teacher, student = pair(drop=(2,))
    ids = windows(n=12)
    whole = copy.deepcopy(student)
    heal(whole, teacher, ids, config=HealConfig(steps=6, teacher_cache=tmp_path / "whole", **FAST))
    config = HealConfig(steps=6, checkpoint_every=2, checkpoint_dir=tmp_path / "state",
                        teacher_cache=tmp_path / "cache", **FAST)

    def interrupt_at_step_5(items, total, description):
        for i, item in enumerate(items):
            if description == "healing" and i == 4:
                raise KeyboardInterrupt
            yield item

    with use_tracker(interrupt_at_step_5), pytest.raises(KeyboardInterrupt):
        heal(copy.deepcopy(student), teacher, ids, config=config)
    forwards = []
    handle = teacher.register_forward_hook(lambda *args: forwards.append(1))
    resumed = copy.deepcopy(student)
    config.resume = True
    result = heal(resumed, teacher, ids, config=config)
    handle.remove()
    assert result.resumed_from == 4 and result.steps == 6 and result.local is None and not forwards
    assert len(list((tmp_path / "cache").glob("teacher-*.safetensors"))) == 1
    for k, v in params(whole).items():
        torch.testing.assert_close(params(resumed)[k], v, rtol=0, atol=1e-7, msg=k)
