"""Selection strategies on tiny models: valid, deterministic, bounded; the scorer's shortcuts
against plain forwards of the modified model."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model

from compressor.adapters import get_adapter
from compressor.calibrate import calibrate
from compressor.errors import InvalidPlanError
from compressor.select import STRATEGIES, SelectContext, SelectSettings, get_strategy, plan_blocks
from compressor.select.maps import accumulate, apply_map
from compressor.select.scoring import Scorer
from compressor.surgery.edit import drop_blocks_, fold_linear_
from compressor.surgery.plan import apply_plan_

F64 = torch.float64


def windows(n=8, t=16, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def six():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = windows()
    return model, ids, calibrate(model, ids)


SMALL = SelectSettings(score_windows=2, candidates=2, first_round=3, spans=2)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_returns_k_distinct_valid_blocks_deterministically(six, strategy):
    model, ids, profile = six
    first = plan_blocks(model, ids, 3, strategy, profile=profile, settings=SMALL)[3]
    again = plan_blocks(model, ids, 3, strategy, profile=profile, settings=SMALL)[3]
    assert len(set(first.drop)) == 3 and all(0 <= i < 6 for i in first.drop)
    assert first.drop == again.drop and first.linearize == again.linearize
    for key, value in first.maps.items():
        torch.testing.assert_close(value, again.maps[key], rtol=0, atol=0)
    assert all(s > 0 for s, _ in first.spans)  # nothing folds into a block before block 0
    assert first.cost["seconds"] >= 0 and first.strategy == strategy
    if STRATEGIES[strategy].measured:
        assert first.cost["loss_evaluations"] > 0


def test_measured_strategies_search_once_for_several_k(six):
    model, ids, profile = six
    plain = plan_blocks(model, ids, [1, 2, 4], "greedy", profile=profile, settings=replace(SMALL, linear=False))
    plans = {(k, linear): search[k] for linear, search in ((False, plain), (True, plain.with_linear(True)))
             for k in search}
    assert set(plans[(1, False)].drop) < set(plans[(2, False)].drop) < set(plans[(4, False)].drop)
    assert plans[(4, True)].drop == plans[(4, False)].drop
    assert plans[(4, False)].linearize == [] and plans[(4, False)].maps == {}
    rounds = plans[(4, False)].cost["loss_evaluations"]
    assert plans[(1, False)].cost["loss_evaluations"] == 6 and rounds == 6 + 5 + 4 + 3


def test_auto_resumes_its_greedy_rounds_from_an_earlier_search_of_the_run(six):
    """With a memo, a search for deeper plans after one for 2 blocks takes rounds 1-2 from it (fewer loss
    evaluations) and finds exactly the plans a single search for them all finds; the earlier depth's plan too."""
    model, ids, profile = six
    together = plan_blocks(model, ids, [2, 4], "auto", profile=profile, settings=SMALL)
    memo = {}
    first = plan_blocks(model, ids, [2], "auto", profile=profile, settings=SMALL, memo=memo)
    later = plan_blocks(model, ids, [4], "auto", profile=profile, settings=SMALL, memo=memo)
    alone = plan_blocks(model, ids, [4], "auto", profile=profile, settings=SMALL)
    for plan, k in ((first[2], 2), (later[4], 4)):
        assert (plan.drop, plan.spans) == (together[k].drop, together[k].spans)
        for key, value in plan.maps.items():
            torch.testing.assert_close(value, together[k].maps[key], rtol=0, atol=0)
    assert later[4].provenance["search"]["rounds"] == together[4].provenance["search"]["rounds"]
    assert later[4].cost["loss_evaluations"] < alone[4].cost["loss_evaluations"]
    other = plan_blocks(model, ids, [4], "auto", profile=profile, settings=replace(SMALL, candidates=3), memo=memo)
    assert other[4].cost["loss_evaluations"] == plan_blocks(  # other settings: nothing taken from the memo
        model, ids, [4], "auto", profile=profile, settings=replace(SMALL, candidates=3))[4].cost["loss_evaluations"]


def test_auto_measures_a_depths_spans_and_forms_only_when_its_plan_is_looked_up(six):
    """Searched for 2 and 3 blocks, with only 2 looked up, auto costs what a search for 2 alone costs: 3's third
    greedy round, spans and forms wait for its plan to be looked up (a depth the pipeline searches beside
    another is often never scored). The plans are the same either way."""
    model, ids, profile = six
    joint = plan_blocks(model, ids, [2, 3], "auto", profile=profile, settings=SMALL)
    single = plan_blocks(model, ids, [2], "auto", profile=profile, settings=SMALL)
    assert joint.context.scorer.evaluations == single.context.scorer.evaluations == 0  # nothing looked up yet
    both, alone = joint[2], single[2]
    assert (both.drop, both.spans) == (alone.drop, alone.spans)
    assert joint.context.scorer.evaluations == single.context.scorer.evaluations > 0
    before = joint.context.scorer.evaluations
    third = joint[3]  # its round, spans and forms now
    assert joint.context.scorer.evaluations > before + third.provenance["search"]["rounds"][2]["evaluated"]
    eager = plan_blocks(model, ids, [3], "auto", profile=profile, settings=SMALL)[3]
    assert (third.drop, third.spans) == (eager.drop, eager.spans)


def test_auto_is_bounded_and_reports_what_it_considered(six):
    model, ids, profile = six
    plan = plan_blocks(model, ids, 2, "auto", profile=profile, settings=SMALL)[2]
    search = plan.provenance["search"]
    assert search["chosen"] in {o["kind"] for o in search["considered"]}
    assert search["rounds"][0]["evaluated"] == 3  # the first-round shortlist
    assert plan.provenance["held_out_windows"] == 2
    # The lowest held-out loss among the candidates won; on this model that is a folded span, so both
    # replacement forms were measured for it and the lower one was kept.
    best = min(search["considered"], key=lambda o: o["loss"])
    assert plan.drop == best["drop"] and plan.spans == [tuple(s) for s in best["spans"]] != []
    losses = search["held_out_loss_by_form"]
    assert set(losses) == {"map", "projection"} and search["form"] == min(losses, key=losses.get)
    assert {s["form"] for s in plan.linearize} == {search["form"]}
    assert plan.provenance["fit"]["exclude_first_token"] is False


def test_auto_falls_back_to_plain_removal_where_maps_cannot_fold():
    model = tiny_model("gemma2", num_hidden_layers=5)
    ids = windows(8)
    plan = plan_blocks(model, ids, 2, "auto", profile=calibrate(model, ids), settings=SMALL)[2]
    assert plan.linearize == [] and len(plan.drop) == 2
    assert "post_feedforward_layernorm" in plan.provenance["note"]
    apply_plan_(model, plan)
    assert get_adapter(model).num_blocks(model) == 3


def test_bad_k_and_unknown_strategy_are_refused(six):
    model, ids, profile = six
    with pytest.raises(InvalidPlanError, match="from 1 to 5"):
        plan_blocks(model, ids, 6, "angular", profile=profile)
    with pytest.raises(InvalidPlanError) as exc:
        get_strategy("best")
    assert all(name in str(exc.value) for name in STRATEGIES)


def _direct_loss(model, ids) -> float:
    """Mean next-token NLL over all tokens, straight from the logits (no compressor code)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()))


def _without(model, drop, fold=None):
    """A real copy of the model with `fold` = (block, T) folded and `drop` removed by surgery."""
    pruned = copy.deepcopy(model)
    if fold is not None:
        fold_linear_(pruned, *fold)
    if drop:
        drop_blocks_(pruned, sorted(drop))
    return pruned


def test_greedy_is_the_best_single_removal_each_round_by_brute_force(six):
    """Each round of greedy must remove the block whose removal, from the model as the earlier rounds
    left it, gives the lowest held-out loss: every candidate deleted from a copy with surgery, scored
    with a direct cross-entropy."""
    model, ids, profile = six
    plan = plan_blocks(model, ids, 3, "greedy", profile=profile, settings=replace(SMALL, linear=False))[3]
    held = ids[SelectContext(model, ids, None, profile, SMALL).score_index]
    removed: list[int] = []
    for entry in plan.provenance["search"]["rounds"]:
        losses = {c: _direct_loss(_without(model, removed + [c]), held) for c in range(6) if c not in removed}
        best = min(losses, key=losses.get)
        assert entry["removed"] == best and entry["evaluated"] == len(losses)
        assert entry["loss"] == pytest.approx(losses[best], abs=1e-4)
        removed.append(best)
    assert plan.drop == sorted(removed)


@pytest.mark.parametrize("strategy", ["linearity", "influence", "angular"])
def test_profile_strategies_follow_the_profile_directly(six, strategy):
    model, ids, profile = six
    plan = plan_blocks(model, ids, 2, strategy, profile=profile, settings=replace(SMALL, linear=False))[2]
    blocks = profile.blocks
    if strategy == "linearity":
        expected = sorted(range(6), key=lambda i: -blocks[i].linearity)[:2]
    elif strategy == "influence":
        expected = sorted(range(6), key=lambda i: blocks[i].block_influence)[:2]
    else:
        span = min((s for s in profile.spans if s.length == 2), key=lambda s: s.angular_distance)
        expected = [span.start, span.start + 1]
    assert plan.drop == sorted(expected)


def test_profile_strategies_refuse_to_run_without_a_profile(six):
    """They used to calibrate silently; now the caller is told to pass one."""
    model, ids, _ = six
    with pytest.raises(InvalidPlanError, match="profile=compressor.calibrate.calibrate"):
        plan_blocks(model, ids, 2, "auto")
    assert plan_blocks(model, ids, 1, "greedy", settings=SMALL)[1].drop  # greedy reads no profile


# One architecture per code path: Llama, Conv1D (GPT-2), in-place residual (Falcon), flattened MLP
# (OPT), parallel residual (Phi, GPT-NeoX), ALiBi (Bloom), a norm that refuses folding (Gemma 2).
@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon", "opt", "phi", "gpt_neox", "bloom", "gemma2"])
def test_scorer_shortcuts_match_plain_forwards(arch):
    model = tiny_model(arch)
    ids = windows(4, 10)
    scorer = Scorer(model, ids, batch_size=3)
    adapter = get_adapter(model)
    # Against the model really pruned by surgery and a direct cross-entropy, not the scorer itself.
    direct = _direct_loss(_without(model, {1, 2}), ids)
    assert scorer.loss({1, 2}) == pytest.approx(direct, rel=1e-5)
    # Remove block 2 after block 1 was removed earlier: restart at block 3 from block 2's input.
    states = scorer.capture({1}, None, [2], [0])
    assert scorer.loss_from({1, 2}, None, 3, states["h2"]) == pytest.approx(direct, rel=1e-5)
    # The last block: only the head runs.
    states = scorer.capture(set(), None, [3])
    assert scorer.loss_from({3}, None, None, states["h3"]) == pytest.approx(_direct_loss(_without(model, {3}), ids),
                                                                         rel=1e-5)
    if adapter.why_no_fold(model.config):
        return
    # A map folded into block 0's projection replacing blocks 1-2 (block 1 already gone).
    T = accumulate(model, ids, [(0, 2)], drop={1})[(0, 2)].solve()
    captured = scorer.capture({1}, None, [2], [0])
    assert len(captured["h2"]) == 2  # one tensor per batch of 3 windows
    moved = [apply_map(h, m, T) for h, m in zip(captured["h2"], captured["m0"])]
    shortcut = scorer.loss_from({1, 2}, None, 3, moved)
    folded = _direct_loss(_without(model, {1, 2}, fold=(0, T)), ids)
    assert shortcut == pytest.approx(folded, rel=1e-4)
    assert scorer.loss({1, 2}, {0: T}) == pytest.approx(folded, rel=1e-4)


def test_a_gemma3_multimodal_checkpoint_is_planned_and_pruned():
    """Gemma3ForConditionalGeneration: its text blocks are scored and removed (no maps: sandwich norm)."""
    from conftest import tiny_gemma3_multimodal

    model = tiny_gemma3_multimodal(num_hidden_layers=4)
    ids = windows(8)
    plan = plan_blocks(model, ids, 1, "auto", profile=calibrate(model, ids), settings=SMALL)[1]
    assert plan.linearize == [] and "post_feedforward_layernorm" in plan.provenance["note"]
    apply_plan_(model, plan)
    assert len(model.model.language_model.layers) == 3 == model.config.text_config.num_hidden_layers
