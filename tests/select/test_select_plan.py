"""Plans: JSON + safetensors round trip, application without calibration data, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from compressor.blocks import runs
from compressor.errors import InvalidPlanError
from compressor.select.linear import linear_plan
from compressor.select.maps import FitSettings
from compressor.surgery.plan import Plan, apply_plan_, read_plan, write_plan


def windows(n=8, t=16, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def mixed_plan(model) -> Plan:
    """Blocks 1-2 replaced by a map, block 4 by a refitted projection, block 5 dropped without either."""
    linear = linear_plan(model, "1-2", windows())
    refit = linear_plan(model, "4", windows(), FitSettings(form="projection"))
    return Plan("manual", 6, [1, 2, 4, 5], linear.linearize + refit.linearize, maps=linear.maps | refit.maps,
                provenance=linear.provenance)


def test_round_trip_applies_exactly_like_the_plan_in_memory(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    plan = mixed_plan(model)
    path = write_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert {"strategy", "drop", "linearize", "blocks_original", "maps"} <= set(data)
    assert data["drop"] == [1, 2, 4, 5]
    assert data["linearize"] == [{"start": 1, "end": 3, "form": "map"}, {"start": 4, "end": 5, "form": "projection"}]
    assert data["maps"] == "plan.maps.safetensors" and (tmp_path / data["maps"]).is_file()

    again = read_plan(path)
    assert again == plan and set(again.maps) == {"span.1-3", "proj.4-5.weight"}
    for key in again.maps:
        torch.testing.assert_close(again.maps[key], plan.maps[key], rtol=0, atol=0)

    direct, from_disk = tiny_model("llama", num_hidden_layers=6), tiny_model("llama", num_hidden_layers=6)
    apply_plan_(direct, plan)
    apply_plan_(from_disk, again)
    ids = windows(2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(from_disk(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert from_disk.config.compressor["removed"] == [1, 2, 4, 5]
    assert from_disk.config.compressor["linearized"] == [{"start": 1, "end": 3}, {"start": 4, "end": 5}]


def test_plan_without_maps_writes_no_maps_file(tmp_path):
    path = write_plan(Plan("angular", 6, [2, 3]), tmp_path / "p.json")
    assert json.loads(path.read_text())["maps"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    assert read_plan(path).drop == [2, 3]


def test_plan_for_another_depth_is_refused():
    model = tiny_model("llama")  # 4 blocks
    with pytest.raises(InvalidPlanError, match="made for a model with 6 blocks, this one has 4"):
        apply_plan_(model, Plan("angular", 6, [2, 3]))


@pytest.mark.parametrize("plan, message", [
    (Plan("x", 6, [0, 1, 2, 3, 4, 5]), "removes all 6 blocks"),
    (Plan("x", 6, [7]), "outside 0-5"),
    (Plan("x", 6, [0, 1], [{"start": 0, "end": 2}], maps={"span.0-2": torch.eye(4)}), "no kept block before"),
    (Plan("x", 6, [2], [{"start": 2, "end": 3}]), "no map for span 2-2"),
    (Plan("x", 6, [2], [{"start": 2, "end": 3, "form": "projection"}], maps={"span.2-3": torch.eye(4)}),
     "no map for span 2-2"),
    (Plan("x", 6, [2], [{"start": 2, "end": 3, "form": "cubic"}]), "unknown form 'cubic'"),
    (Plan("x", 6, [2], [{"start": 2, "end": 4}], maps={"span.2-4": torch.eye(4)}), "not a run of dropped"),
])
def test_invalid_plans_say_what_is_wrong(plan, message):
    with pytest.raises(InvalidPlanError, match=message):
        plan.validate()


def test_missing_maps_file_and_non_plans_are_refused(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    path = write_plan(mixed_plan(model), tmp_path / "plan.json")
    (tmp_path / "plan.maps.safetensors").unlink()
    with pytest.raises(InvalidPlanError, match="maps file .* is missing"):
        read_plan(path)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(InvalidPlanError, match="not a compressor plan"):
        read_plan(tmp_path / "other.json")
    with pytest.raises(InvalidPlanError, match="does not exist"):
        read_plan(tmp_path / "nothing.json")


def test_summary_and_runs():
    plan = Plan("auto", 30, [12, 13, 14, 20], [{"start": 12, "end": 15}], cost={"seconds": 3.0, "loss_evaluations": 7},
                maps={"span.12-15": torch.eye(2)})
    text = plan.summary()
    assert "remove 4 of 30 blocks, keep 26" in text and "12-14 -> map folded into block 11" in text
    refit = Plan("auto", 30, [3], [{"start": 3, "end": 4, "form": "projection"}], maps={"proj.3-4.weight": torch.eye(2)})
    assert "3 -> refitted MLP projection of block 2" in refit.summary()
    assert "dropped without replacement: 20" in text and "7 loss evaluations" in text
    assert runs([3, 4, 5, 9, 11, 12]) == [(3, 6), (9, 10), (11, 13)]


def test_applied_copy_equals_a_deep_copy_with_the_plan_applied_and_leaves_the_model_alone():
    import copy

    from compressor.adapters import get_adapter
    from compressor.surgery.plan import applied_copy

    model = tiny_model("llama", num_hidden_layers=6)
    plan = mixed_plan(model)
    ids = windows(2, 12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        reference = copy.deepcopy(model)
        apply_plan_(reference, plan)
        pruned = applied_copy(model, plan)
        torch.testing.assert_close(pruned(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    adapter = get_adapter(model)
    assert adapter.num_blocks(model) == 6 and adapter.num_blocks(pruned) == 2
    # Shared: weights the plan does not change; owned: the projections the maps were folded into.
    original, kept = adapter.blocks_of(model), adapter.blocks_of(pruned)
    assert kept[0].self_attn.q_proj.weight is original[0].self_attn.q_proj.weight
    assert adapter.mlp_out_of(kept[0]).weight is not adapter.mlp_out_of(original[0]).weight
