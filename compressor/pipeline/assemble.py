"""The last stage: original and compressed benchmarked side by side, and the typed Report."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.info import count_parameters
from compressor.pipeline.config import EXPORT_FOR_BACKEND
from compressor.pipeline.data import perplexities
from compressor.pipeline.deliver import CHECKPOINT
from compressor.pipeline.measure import backend_for, measure_speedup, open_backend, workload_ms
from compressor.pipeline.precision import original_perplexity
from compressor.report import (
    Attempt,
    BackendInfo,
    Baseline,
    Pair,
    Perplexities,
    Report,
    SweepPoint,
    TradeoffPoint,
)
from compressor.util.io import dir_size
from compressor.util.progress import status


def final_bench(run, compressed, precision: str):
    """(Speedup, (original, compressed) bench results of its median round); the compressed model is timed
    from its delivered export when that is what the backend runs, so the numbers are those of the
    shipped file, with the protocol of every probe (`measure.measure_speedup`)."""
    cfg = run.cfg
    status("benchmarking original and compressed side by side")
    original = backend_for(run, run.model, "probe-original")
    if cfg.format != "none" and EXPORT_FOR_BACKEND.get(cfg.backend) == cfg.format:
        mine = open_backend(run, run.work / cfg.format, precision)
    else:
        mine = backend_for(run, compressed, "probe-final", precision)
    speed, pair = measure_speedup(run, original, mine, cfg.target_speedup, short_again=True)
    return speed, pair, mine


def delivered_perplexities(compressed, backend, precision: str, evaluation: dict) -> dict[str, float]:
    """Perplexity of what is delivered: through the runtime for a quantized or half-precision export
    (its weights are not the PyTorch model's), the PyTorch model's at fp32."""
    if precision == "fp32":
        return perplexities(compressed, evaluation)
    try:
        return perplexities(backend, evaluation)
    finally:
        backend.close()


def build_report(run, *, plan, compressed, data, pruned_ppl: dict, heal: dict | None, exports: dict,
                 points: list[dict], choice: dict, sweep: list[dict] | None, bench, dest: Path | None) -> Report:
    """The run's Report; `dest` is where the run directory will be (None: nothing is written)."""
    from compressor import __version__

    cfg = run.cfg
    speed, (ra, rb), backend = bench
    precision = choice["precision"]
    original_ppl = original_perplexity(points)  # scored by the precision stage, on the same texts
    healed_ppl = perplexities(compressed, data.evaluation) if heal else pruned_ppl
    if precision == "fp32" and heal:
        compressed_ppl = healed_ppl  # at fp32 what is delivered is the healed PyTorch model: scored once
    elif not (plan.drop or plan.linearize):  # the unpruned model's export: its quantize-only point scored it
        compressed_ppl = next(p["perplexity"] for p in points if p["precision"] == precision)
        backend.close()
    else:
        compressed_ppl = delivered_perplexities(compressed, backend, precision, data.evaluation)
    if cfg.target_speedup:
        verdict = speed.against(cfg.target_speedup)
    else:
        verdict = "met" if all(compressed_ppl[n] <= original_ppl[n] * (1 + cfg.max_ppl_increase)
                               for n in original_ppl) else "missed"
    sizes = None
    if isinstance(run.source, Path):
        sizes = Pair(original=dir_size(run.source), compressed=dir_size(run.work / CHECKPOINT))
    baselines = _baselines(points, choice, speed, compressed_ppl, bool(heal), workload_ms(ra))
    attempts = [a for t in choice.get("tried", []) for a in t.get("attempts") or []]
    return Report(
        tool=f"compressor {__version__}", model=str(cfg.model), model_source=str(run.source),
        target_speedup=cfg.target_speedup, max_ppl_increase=cfg.max_ppl_increase, speedup_measured=speed.value,
        speedup_spread=speed.spread, precision=precision,
        target_met=verdict != "missed", target_verdict=verdict, blocks_original=plan.blocks_original, blocks_removed=plan.drop,
        blocks_linearized=plan.linearize,
        perplexity=Perplexities(original=original_ppl, pruned_before_heal=pruned_ppl, compressed=compressed_ppl,
                                healed_full_precision=healed_ppl if precision != "fp32" else {}),
        perplexity_increase={n: compressed_ppl[n] / original_ppl[n] - 1 for n in original_ppl},
        latency=Pair(original=ra.to_dict(), compressed=rb.to_dict()),
        workload=f"batch {cfg.batch}: prefill {cfg.prefill_tokens} + {cfg.new_tokens} decoded tokens",
        workload_latency_ms=Pair(original=workload_ms(ra), compressed=workload_ms(rb)),
        backend=BackendInfo(name=cfg.backend, device=cfg.device, threads=cfg.threads or torch.get_num_threads(),
                            versions=ra.versions),
        parameters=Pair(original=count_parameters(run.model), compressed=count_parameters(compressed)),
        size_bytes=sizes, plan={**plan.to_dict(), "summary": plan.summary()},
        attempts=[Attempt(**a) for a in attempts], heal=heal, exports=exports,
        settings={k: str(v) if isinstance(v, (Path, tuple)) else v for k, v in asdict(cfg).items()},
        seconds=dict(run.runner.seconds), notes=_notes(plan, speed.rounds, choice, run.reused_timings),
        timings_reused=list(run.reused_timings),
        tradeoff=_tradeoff(original_ppl, pruned_ppl, compressed_ppl, workload_ms(ra), workload_ms(rb)),
        baselines=baselines, choice={k: v for k, v in choice.items() if k != "tried"},
        sweep=[SweepPoint(**p) for p in sweep] if sweep is not None else None,
        artifacts=_artifacts(dest, exports))


def _baselines(points: list[dict], choice: dict, speed, compressed_ppl: dict, healed: bool,
               original_ms: float) -> list[Baseline]:
    """The quantize-only points, the depth-only point at fp32 and the chosen combination, on one latency axis:
    the final benchmark's original latency over each point's own measured speedup."""
    def at(speedup):
        return original_ms / speedup if speedup else None

    out = [Baseline(kind="quantize-only", precision=p["precision"], blocks_removed=0, speedup=p["speedup"],
                    spread=p["spread"], latency_ms=at(p["speedup"]), perplexity=p["perplexity"]) for p in points]
    d = choice.get("depth_only")
    if d:
        out.append(Baseline(kind="depth-only", precision="fp32", blocks_removed=d["blocks"], speedup=d.get("speedup"),
                            spread=d.get("spread"), latency_ms=at(d.get("speedup")), perplexity=d.get("estimate") or {},
                            note=d.get("why") or _bound_note(d), perplexity_at_least=d.get("at_least") or {}))
    out.append(Baseline(kind="chosen", precision=choice["precision"], blocks_removed=choice["blocks"],
                        speedup=speed.value, spread=speed.spread, latency_ms=at(speed.value),
                        perplexity=compressed_ppl, healed=healed))
    return out


def _bound_note(d: dict) -> str:
    if not d.get("at_least"):
        return "training-free"
    return ("training-free; not scored: a shallower plan already scores above the chosen combination's "
            "estimate, so its perplexity is at least that (perplexity_at_least)")


def _notes(plan, rounds: list[float], choice: dict, reused: list[dict]) -> list[str]:
    from compressor.pipeline.timings import reuse_note

    notes = [plan.provenance["note"]] if plan.provenance.get("note") else []
    notes += [n for n in [reuse_note(reused)] if n]
    notes += [f"{t['precision']}: out of reach ({t['why']})" for t in choice.get("tried", []) if t.get("why")]
    notes += [f"{t['precision']}: not searched further ({t['beaten']})" for t in choice.get("tried", []) if t.get("beaten")]
    if len(rounds) > 1:
        notes.append(f"the final benchmark was measured {len(rounds)} times (speedups "
                     f"{', '.join(f'{s:.3f}x' for s in rounds)}); the median round is reported")
    return notes


def _tradeoff(original_ppl, pruned_ppl, compressed_ppl, lo: float, lc: float) -> list[TradeoffPoint]:
    name = next(iter(original_ppl))
    points = [TradeoffPoint(label="original", latency_ms=lo, perplexity=original_ppl[name]),
              TradeoffPoint(label="pruned (before healing)", latency_ms=lc, perplexity=pruned_ppl[name]),
              TradeoffPoint(label="compressed", latency_ms=lc, perplexity=compressed_ppl[name])]
    return [p for p in points if math.isfinite(p.perplexity)]


def _artifacts(dest: Path | None, exports: dict) -> dict[str, str]:
    if dest is None:
        return {}
    return {"checkpoint": str(dest / CHECKPOINT), **{f: str(dest / f) for f in exports},
            "profile": str(dest / "profile.json"), "report_json": str(dest / "report.json"),
            "report_md": str(dest / "report.md"), "report_html": str(dest / "report.html")}
