"""`auto` (ours): a greedy search in which every candidate is scored with its linear replacement
already fitted and applied, against the best angular spans with their replacement.

It decides per run whether a map helps, and falls back to plain removal where the architecture
cannot fold a map (the adapter says why); see `auto` for the search.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from compressor.blocks import next_kept
from compressor.select.maps import FORMS, accumulate, apply_map, fit_spans
from compressor.select.registry import Choice, Deferred, SelectContext, angular_spans, finite, register

log = logging.getLogger(__name__)


@register("auto", "greedy search scoring each candidate with its linear replacement applied, "
          "against the best angular spans; keeps the lowest held-out loss", measured=True, uses_maps=True)
def auto(context: SelectContext, ks: list[int]) -> Deferred:
    """Ours. Two kinds of candidate plan, both measured on held-out windows with maps fitted on the rest:

    1. Greedy with the fold in the loop: each round, removing block c means folding a map fitted
       from its kept predecessor p's MLP projection to c's output (composed with any map p holds),
       so runs grow one block at a time and several short runs compete with one long one. Round
       one measures the profile's shortlist (`first_round` blocks whose removal perturbs least);
       later rounds re-measure the best `candidates` so far plus the neighbours of the last
       removal (the candidates whose fit changed most).
    2. The `spans` contiguous spans of length K with the least angular distance, each folded.
    The lower held-out loss wins; then both replacement forms (the ReplaceMe map, and the refitted
    projection) are fitted for the winner and the lower held-out loss again decides. Where maps
    cannot be folded, the same search runs with plain removals.
    """
    # Each depth is searched when its plan is first looked up (its greedy rounds resume from the memo, then its
    # spans and forms are measured): a depth searched beside another (pipeline.plan.TrainingFree) often never is.
    return Deferred(ks, lambda k: _choice(context, k, _greedy_with_fold(context, [k])[k]))


def _choice(context: SelectContext, k: int, greedy: dict) -> Choice:
    base = context.memo.get("unpruned loss")
    if base is None:
        base = context.memo["unpruned loss"] = context.scorer.loss()
    options = [greedy] + (_measured_spans(context, k) if context.settings.spans > 0 else [])
    best = min(options, key=lambda o: o["loss"])
    details = {"held_out_loss_unpruned": round(base, 5), "held_out_loss": round(best["loss"], 5),
               "chosen": best["kind"],
               "considered": [{"kind": o["kind"], "drop": o["drop"], "spans": o["spans"],
                               "loss": round(o["loss"], 5)} for o in options],
               "rounds": greedy["rounds"]}
    form = None
    if best["spans"]:
        form, losses = _choose_form(context, best["drop"], best["spans"])
        details |= {"form": form, "held_out_loss_by_form": {f: round(v, 5) for f, v in losses.items()},
                    "held_out_loss": round(losses[form], 5)}
    if not context.fold:
        details["note"] = context.no_fold_note()
    return Choice(best["drop"], best["spans"], details, cost=context.cost_so_far(), form=form)


def _choose_form(context: SelectContext, drop: list[int], spans: list[tuple[int, int]]) -> tuple[str, dict[str, float]]:
    """Fit each replacement form on the fit windows; keep the one with the lower held-out loss."""
    fit_ids, fit_mask = context.part("search")
    losses = {}
    for form in FORMS:
        fits = fit_spans(context.model, fit_ids, drop, spans, replace(context.settings.fit, form=form), fit_mask)
        losses[form] = context.scorer.loss(drop, {f.start - 1: f.replacement for f in fits})
    return min(losses, key=lambda f: (losses[f], f)), losses


def _greedy_with_fold(context: SelectContext, ks: list[int]) -> dict[int, dict]:
    """The greedy search's plan after each round in `ks`. Its rounds do not depend on the depths asked for,
    so they are kept in `context.memo`: a later search asking for deeper plans resumes where it ended."""
    s, scorer, n = context.settings, context.scorer, context.num_blocks
    fit_ids, fit_mask = context.part("search")
    memo = context.memo.setdefault("greedy", {"done": 0, "after": {}})
    removed: set[int] = set()
    maps: dict[int, torch.Tensor] = {}        # kept block -> map folded into its projection
    span_end: dict[int, int] = {}             # kept block -> end of the span its map replaces
    measured: dict[int, float] = {}           # block -> last measured loss after removing it
    last, rounds = None, []
    if memo["done"]:
        state = memo["state"]
        removed, maps, span_end, measured = (set(state["removed"]), dict(state["maps"]), dict(state["span_end"]),
                                             dict(state["measured"]))
        last, rounds = state["last"], list(state["rounds"])
        log.info("auto: rounds 1-%d as an earlier search of this run took them", memo["done"])
    for round_ in range(memo["done"] + 1, max(ks) + 1):
        kept = [i for i in range(n) if i not in removed]
        candidates = _round_candidates(context, kept, measured, last)
        prev = {c: (kept[kept.index(c) - 1] if kept.index(c) > 0 else None) for c in candidates}
        pairs = [(prev[c], c) for c in candidates if context.fold and prev[c] is not None]
        eqs = accumulate(context.model, fit_ids, pairs, s.fit, fit_mask, removed, maps,
                         description=f"auto round {round_}: fitting") if pairs else {}
        states = scorer.capture(removed, maps, candidates, {p for p, _ in pairs})
        results = []
        for c in candidates:
            after = removed | {c}
            nxt = next_kept(c, after, n)
            if (prev[c], c) in eqs:
                T = eqs[(prev[c], c)].solve(s.fit.ridge)
                moved = [apply_map(h, m, T) for h, m in zip(states[f"h{c}"], states[f"m{prev[c]}"])]
                results.append((scorer.loss_from(after, maps, nxt, moved), c, T))
            else:
                results.append((scorer.loss_from(after, maps, nxt, states[f"h{c}"]), c, None))
            measured[c] = results[-1][0]
        loss, best, T = min(results, key=lambda r: (r[0], r[1]))
        p = prev[best]
        end = span_end.pop(best, best + 1)
        maps.pop(best, None)
        if T is not None:
            maps[p] = T if p not in maps else maps[p] @ T
            span_end[p] = end
        removed.add(best)
        measured.pop(best, None)
        last = best
        rounds.append({"round": round_, "removed": best, "linear": T is not None, "loss": round(loss, 5),
                       "evaluated": len(results)})
        log.info("auto round %d: removed block %d%s (held-out loss %.4f, %d candidates)", round_, best,
                 " with a linear map" if T is not None else "", loss, len(results))
        memo["after"][round_] = {"kind": "greedy with linear maps" if context.fold else "greedy",
                                 "drop": sorted(removed), "spans": sorted((q + 1, e) for q, e in span_end.items()),
                                 "loss": loss, "rounds": list(rounds)}
        memo["done"], memo["state"] = round_, {"removed": set(removed), "maps": dict(maps), "span_end": dict(span_end),
                                               "measured": dict(measured), "last": last, "rounds": list(rounds)}
    return {k: memo["after"][k] for k in ks}


def _round_candidates(context: SelectContext, kept: list[int], measured: dict[int, float], last: int | None) -> list[int]:
    s = context.settings
    if last is None:
        return _profile_shortlist(context, kept, s.first_round)
    ranked = sorted((c for c in measured if c in kept), key=lambda c: (measured[c], c))[: s.candidates]
    i = kept.index(next((c for c in kept if c > last), kept[-1]))
    neighbours = {kept[j] for j in (i - 1, i) if 0 <= j < len(kept)}
    return sorted(set(ranked) | neighbours)


def _profile_shortlist(context: SelectContext, kept: list[int], count: int) -> list[int]:
    """Blocks whose removal perturbs the residual stream least, by the profile: the mean of the
    ranks by block influence and by relative contribution (block 0 only when it can be dropped)."""
    if count <= 0 or count >= len(kept):
        return list(kept)
    blocks = context.profile.blocks
    pool = [i for i in kept if i > 0 or not context.fold]
    by_influence = sorted(pool, key=lambda i: (finite(blocks[i].block_influence, 1e9), i))
    by_contribution = sorted(pool, key=lambda i: (finite(blocks[i].relative_contribution, 1e9), i))
    rank = {i: by_influence.index(i) + by_contribution.index(i) for i in pool}
    return sorted(sorted(pool, key=lambda i: (rank[i], i))[:count])


def _measured_spans(context: SelectContext, k: int) -> list[dict]:
    """The least-angular contiguous spans of length k, each with its map, measured as a whole."""
    starts = [st for st in angular_spans(context, k, context.settings.spans, allow_zero=not context.fold) if st + k <= context.num_blocks]
    fit_ids, fit_mask = context.part("search")
    pairs = [(st - 1, st + k - 1) for st in starts if context.fold and st > 0]
    eqs = accumulate(context.model, fit_ids, pairs, context.settings.fit, fit_mask,
                     description="auto: fitting span maps") if pairs else {}
    inputs = set(starts)
    states = context.scorer.capture((), None, inputs, {p for p, _ in pairs})
    options = []
    for st in starts:
        drop = set(range(st, st + k))
        nxt = next_kept(st, drop, context.num_blocks)
        if (st - 1, st + k - 1) in eqs:
            T = eqs[(st - 1, st + k - 1)].solve(context.settings.fit.ridge)
            moved = [apply_map(h, m, T) for h, m in zip(states[f"h{st}"], states[f"m{st - 1}"])]
            loss, spans = context.scorer.loss_from(drop, None, nxt, moved), [(st, st + k)]
        else:
            loss, spans = context.scorer.loss_from(drop, None, nxt, states[f"h{st}"]), []
        options.append({"kind": "angular span" + (" with a linear map" if spans else ""),
                        "drop": sorted(drop), "spans": spans, "loss": loss})
    return options
