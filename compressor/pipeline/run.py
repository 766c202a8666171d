"""The whole pipeline, read top to bottom:

load -> calibrate (cached) -> quantize only: each precision the backend runs, timed and scored ->
precision x depth: the blocks each precision needs for the target, by *measured* speedup, and the
combination with the lowest perplexity (under a budget, the fastest within it) -> plan (default
strategy) -> linearize/prune -> heal in full precision -> export at the chosen precision, validated
-> benchmark original and compressed side by side -> Report, with the quantize-only and depth-only
baselines.

With `out`, stage results live in a work directory beside it (`.NAME.work`); a rerun with the same
settings resumes from what it holds, and on success the work directory becomes `out`, without the
runner's bookkeeping. Bad input found before the first stage removes it, so nothing half-written is
left behind; any failure after that (an unreachable target, a builder or validation failure, a
quantized export outside its bounds), an interruption or a crash keeps it, and the error says where
and how to resume. Without `out` the work happens in a temporary directory that is removed at the
end: only the Report comes back.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict
from pathlib import Path

from compressor.errors import CompressorError
from compressor.pipeline.assemble import build_report, final_bench
from compressor.pipeline.calibrate import calibrate_stage
from compressor.pipeline.config import PipelineConfig, validate
from compressor.pipeline.data import load_data, perplexities
from compressor.pipeline.deliver import export_stage, save_stage
from compressor.pipeline.heal import heal_stage
from compressor.pipeline.plan import choice_stage, plan_inputs, plan_stage, sweep_stage
from compressor.pipeline.precision import precision_stage
from compressor.pipeline.runner import Run, Runner
from compressor.util.io import check_output, write_json
from compressor.util.progress import status


def work_dir(out: Path | str) -> Path:
    """Where a run into `out` keeps its stage results until it finishes (kept for resuming)."""
    out = Path(out)
    return out.resolve().parent / f".{out.name}.work"


def run_pipeline(cfg: PipelineConfig, out: Path | str | None = None, overwrite: bool = False, *,
                 model=None, tokenizer=None):
    """Compress `cfg.model` (or the given model and tokenizer) and return its Report; with `out`, also
    the run directory (report.json/md/html, the checkpoint, the export, the plan and the profile)."""
    validate(cfg)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="compressor-run-") as tmp:
            return _run(cfg, Runner(Path(tmp) / "work", persistent=False), model, tokenizer, dest=None)
    out = check_output(out, overwrite)
    return _run(cfg, Runner(work_dir(out)), model, tokenizer, dest=out)


def _run(cfg: PipelineConfig, runner: Runner, model, tokenizer, dest: Path | None):
    from compressor.report import write_reports

    # An in-memory model has no identity a later run could check, so its work never resumes.
    runner.prepare(cfg.model, asdict(cfg), fresh=model is not None)
    run = None
    try:
        run = _load(cfg, runner, model, tokenizer)
        report, profile = _stages(run, dest)
    except CompressorError as exc:
        if not runner.started or dest is None:
            runner.discard()
            raise
        exc.args = ((f"{exc} (the work directory {runner.work} is kept: fix this and rerun the same command "
                    "to resume from the finished stages)"),)
        raise
    finally:
        if run is not None:
            run.close_backends()
    if dest is not None:
        write_reports(report, runner.work, profile.to_dict())
        write_json(runner.work / "profile.json", profile.to_dict())
        runner.deliver(dest)
    return report


def _load(cfg: PipelineConfig, runner: Runner, model, tokenizer) -> Run:
    if model is not None:
        return Run(cfg, runner, model, tokenizer, source=None)
    from compressor.loading import load_model, resolve

    status(f"loading {cfg.model}")
    source = resolve(cfg.model)
    model, tokenizer = load_model(source, device=cfg.device if cfg.device != "auto" else None,
                                  device_map="auto" if cfg.device == "auto" else None)
    return Run(cfg, runner, model, tokenizer, source)


def _stages(run: Run, dest: Path | None):
    from compressor.surgery.plan import apply_plan_

    data = load_data(run.cfg, run.tokenizer)
    profile = calibrate_stage(run, data.calibration)
    points = precision_stage(run, data)
    choice = choice_stage(run, data, profile, points)
    plan = plan_stage(run, data, choice, profile)
    sweep = sweep_stage(run, data, profile, points)
    compressed = run.model  # a precision alone may meet the target: the original, as it is, is exported
    if plan.drop or plan.linearize:
        compressed = copy.deepcopy(run.model)
        apply_plan_(compressed, plan)
    pruned_ppl = _training_free_perplexity(compressed, data, points, choice)
    heal = heal_stage(run, compressed, data.healing, plan_inputs(run.cfg, choice), choice["precision"])
    save_stage(run, compressed)
    exports = export_stage(run, compressed, choice["precision"])
    report = build_report(run, plan=plan, compressed=compressed, data=data, pruned_ppl=pruned_ppl, heal=heal,
                          exports=exports, points=points, choice=choice, sweep=sweep,
                          bench=final_bench(run, compressed, choice["precision"]), dest=dest)
    return report, profile


def _training_free_perplexity(compressed, data, points: list[dict], choice: dict) -> dict:
    """The compressed model's perplexity before healing: the choice scored this very plan already (the
    plan it estimated with is the plan applied), and with no block removed it is the original's."""
    from compressor.pipeline.precision import original_perplexity

    if not choice["blocks"]:
        return original_perplexity(points)
    scored = choice.get("depth_perplexity", {}).get(str(choice["blocks"]))
    return scored if scored is not None else perplexities(compressed, data.evaluation)
