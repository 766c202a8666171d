"""`compress model`: the one-command pipeline, read top to bottom.

load -> calibrate (cached) -> latency model on the target backend -> choose K by *measured* speedup
-> plan (default strategy) -> linearize/prune -> heal -> export -> benchmark original and compressed
side by side -> reports.

Stage results live in a work directory beside the output (`.NAME.work`); a rerun with the same
settings resumes from what it holds. On success the work directory is renamed to the output; a
deliberate stop (unreachable target, bad input) removes it, so nothing half-written is left behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compressor import __version__
from compressor.adapters import get_adapter
from compressor.errors import CompressorError, DataError, InvalidPlanError
from compressor.info import count_parameters
from compressor.io import check_output, dir_size, write_json
from compressor.progress import status

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "none")


@dataclass
class PipelineConfig:
    model: str = "smollm2-135m"
    target_speedup: float | None = None
    max_ppl_increase: float | None = None  # fraction: 0.1 is 10 %
    data: Path | None = None
    field: str = "text"
    eval: tuple[Path, ...] = ()
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    prefill_tokens: int = 512
    new_tokens: int = 128
    batch: int = 1
    strategy: str = "auto"
    heal_steps: int = 60
    heal_minutes: float = 4.0
    heal_train: str = "touched"       # see HealConfig.train
    heal_lr: float | None = None      # None: HealConfig's default for heal_train
    format: str = "onnx"
    max_probes: int = 4               # measured depths when confirming the target speedup
    speedup_margin: float = 0.02      # a probe must reach target x (1 + margin): repeated measurements of
                                      # one pair vary by about 1-2 %, and the final benchmark is another one
    eval_max_tokens: int = 8192
    timing_seconds: float = 2.0
    search_windows: int = 16          # auto: windows its maps are fitted on during the search (cost bound)
    sweep: tuple[float, ...] = ()     # fractions of the blocks to remove for the extra sweep points

    def key(self, *fields: str) -> str:
        """A hash of the named settings (all of them when none are named)."""
        data = {k: str(v) for k, v in asdict(self).items() if not fields or k in fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# The settings each resumable stage depends on: a rerun reuses a stage whose settings are unchanged.
STAGE_INPUTS = {
    "profile": ("data", "field", "samples", "seq_len", "seed"),
    "latency_model": ("backend", "device", "threads", "prefill_tokens", "new_tokens", "batch", "timing_seconds"),
    "blocks": ("backend", "device", "threads", "prefill_tokens", "new_tokens", "batch", "timing_seconds",
               "target_speedup", "max_probes", "speedup_margin"),
    "plan": ("data", "field", "samples", "seq_len", "seed", "strategy", "target_speedup", "max_ppl_increase",
             "backend", "device", "threads", "prefill_tokens", "new_tokens", "batch", "timing_seconds",
             "max_probes", "speedup_margin", "search_windows", "eval", "eval_max_tokens"),
    "sweep": ("data", "field", "samples", "seq_len", "seed", "strategy", "search_windows", "backend", "device",
              "threads", "prefill_tokens", "new_tokens", "batch", "timing_seconds", "sweep", "eval",
              "eval_max_tokens"),
}
STAGE_INPUTS["heal"] = STAGE_INPUTS["plan"] + ("heal_steps", "heal_minutes", "heal_train", "heal_lr")


def validate(cfg: PipelineConfig) -> None:
    """Every problem with the settings at once, before anything is loaded or written."""
    from compressor.evaluate import backend_names
    from compressor.heal.config import TRAIN_CHOICES

    problems = []
    if (cfg.target_speedup is None) == (cfg.max_ppl_increase is None):
        problems.append("give exactly one of --target-speedup or --max-ppl-increase")
    if cfg.target_speedup is not None and not cfg.target_speedup > 1:
        problems.append(f"--target-speedup must be above 1 (got {cfg.target_speedup})")
    if cfg.max_ppl_increase is not None and not cfg.max_ppl_increase > 0:
        problems.append(f"--max-ppl-increase must be positive (got {cfg.max_ppl_increase:.0%})")
    if any(not 0 <= level < 1 for level in cfg.sweep):
        problems.append(f"--sweep levels are percentages of the blocks from 0 up to (not including) 100: "
                        f"got {', '.join(f'{level:.0%}' for level in cfg.sweep)}")
    if cfg.backend not in backend_names():
        problems.append(f"unknown backend '{cfg.backend}': choose one of {', '.join(backend_names())}")
    if cfg.format not in FORMATS:
        problems.append(f"unknown format '{cfg.format}': choose one of {', '.join(FORMATS)}")
    if cfg.heal_train not in TRAIN_CHOICES:
        problems.append(f"--heal-train must be one of {', '.join(TRAIN_CHOICES)} (got '{cfg.heal_train}')")
    if cfg.heal_lr is not None and not cfg.heal_lr > 0:
        problems.append(f"--heal-lr must be positive (got {cfg.heal_lr})")
    if not cfg.heal_minutes > 0:
        problems.append(f"--heal-minutes must be positive (got {cfg.heal_minutes})")
    for path in ([cfg.data] if cfg.data else []) + list(cfg.eval):
        if not Path(path).exists():
            problems.append(f"{path} does not exist")
    if problems:
        raise CompressorError("; ".join(problems))
    if cfg.format == "tensorrt" or cfg.backend == "tensorrt":
        from compressor.export.tensorrt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda("TensorRT")
    if cfg.format != "none" or cfg.backend == "onnxruntime":
        from compressor.errors import require

        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "onnx", "exporting to ONNX")


@dataclass
class Run:
    """What the stages share: settings, the work directory, the loaded model, timings."""

    cfg: PipelineConfig
    work: Path
    model: torch.nn.Module | None = None
    tokenizer: object = None
    source: Path | str | None = None
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def cached(self, name: str, compute):
        """Run a stage once: its JSON result is kept in the work directory for resumption."""
        path = self.work / f"{name}.stage.json"
        key = self.cfg.key(*STAGE_INPUTS[name])
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                log.info("resuming: %s from %s", name, path)
                return stored["result"]
        start = time.perf_counter()
        result = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        write_json(path, {"key": key, "result": result})
        return result


def run_pipeline(cfg: PipelineConfig, out: Path | str, overwrite: bool = False) -> dict:
    """Compress cfg.model into `out`; returns the report (also written as report.json/md/html)."""
    validate(cfg)
    out = check_output(out, overwrite)
    work = out.resolve().parent / f".{out.name}.work"
    _prepare_work(work, cfg)
    run = Run(cfg, work)
    try:
        report = _stages(run)
    except CompressorError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    for scratch in [*work.glob("probe-*"), *work.glob("heal-state-*"), *work.glob("*.tmp")]:
        shutil.rmtree(scratch, ignore_errors=True)  # latency probes and training state: not deliverables
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    report["artifacts"] = {k: str(out / Path(v).relative_to(work)) if str(v).startswith(str(work)) else v
                           for k, v in report["artifacts"].items()}
    _rewrite_reports(report, out)
    return report


def _prepare_work(work: Path, cfg: PipelineConfig) -> None:
    settings = work / "settings.json"
    # Everything in the work directory derives from the model; other settings are keyed per stage.
    if work.exists() and (not settings.is_file() or json.loads(settings.read_text()).get("model") != cfg.model):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(settings, {"model": cfg.model, "key": cfg.key(), "settings": asdict(cfg)})


def _stages(run: Run) -> dict:
    from compressor.loading import load_model, resolve

    cfg = run.cfg
    status(f"loading {cfg.model}")
    run.source = resolve(cfg.model)
    run.model, run.tokenizer = load_model(run.source, device=cfg.device if cfg.device != "auto" else None,
                                          device_map="auto" if cfg.device == "auto" else None)
    calib_windows, heal_windows, eval_sets = _data(run)
    profile = run.cached("profile", lambda: _calibrate(run, calib_windows))
    if cfg.target_speedup is not None:
        found = run.cached("blocks", lambda: _blocks_for_target(run))
        k, attempts = found["k"], found["attempts"]
    else:
        k, attempts = None, []
    plan, plan_ppl = _plan_stage(run, calib_windows, eval_sets, k, profile)
    sweep = run.cached("sweep", lambda: _sweep(run, calib_windows, eval_sets, profile)) if cfg.sweep else None
    compressed = copy.deepcopy(run.model)
    from compressor.plan import apply_plan_

    apply_plan_(compressed, plan)
    pruned_ppl = _perplexities(compressed, eval_sets)
    heal_info = _heal(run, compressed, heal_windows)
    checkpoint = run.work / "model"
    _save(run, compressed, checkpoint)
    exports = _exports(run, compressed)
    return _finish(run, plan, compressed, eval_sets, pruned_ppl, heal_info, checkpoint, exports, attempts,
                   profile, plan_ppl, sweep)


def _data(run: Run):
    """Calibration windows and healing windows from the data, and held-out evaluation token sets."""
    from compressor.calibrate import load_texts
    from compressor.calibrate.data import token_stream, windows_of
    from compressor.evaluate import load_eval_tokens
    from compressor.heal import HealConfig

    cfg = run.cfg
    texts = load_texts(cfg.data, cfg.field)
    joined = "\n\n".join(texts)
    cut = joined.rfind(" ", 0, int(len(joined) * 0.85))
    calib_text, holdout = joined[:cut], joined[cut:]
    stream = token_stream(run.tokenizer, [calib_text])
    windows = windows_of(stream, cfg.samples, cfg.seq_len, cfg.seed)
    # Healing draws its own windows from the same text: as many as its steps can use, so it does not
    # cycle over the few calibration windows.
    wanted = max(cfg.samples, cfg.heal_steps * HealConfig.batch_size)
    heal_windows = windows_of(stream, wanted, cfg.seq_len, cfg.seed + 1, at_most=True) if cfg.heal_steps > 0 else None
    eval_sets = {}
    for path in cfg.eval:
        eval_sets[Path(path).name] = load_eval_tokens(run.tokenizer, path, cfg.field, cfg.eval_max_tokens)
    if not eval_sets:
        ids = run.tokenizer(holdout, return_tensors="pt").input_ids[0][: cfg.eval_max_tokens]
        if ids.numel() < 2:
            raise DataError("the held-out part of the calibration text is empty: pass --eval FILE")
        eval_sets["held-out " + (Path(cfg.data).name if cfg.data else "bundled text")] = ids
    return windows, heal_windows, eval_sets


def _calibrate(run: Run, windows) -> dict:
    from compressor.calibrate import profile_for

    status("calibrating")
    return profile_for(run.model, windows, seed=run.cfg.seed).to_dict()


def _backend(run: Run, model, name: str):
    """A benchmark backend for `model` on the target backend (exporting it first when needed)."""
    from compressor.evaluate import get_backend
    from compressor.evaluate.backends import TorchBackend

    cfg = run.cfg
    if cfg.backend == "torch":
        return TorchBackend(model, device=cfg.device if cfg.device != "auto" else None, threads=cfg.threads)
    path = run.work / name
    if not (path / "export.json").is_file():
        _export(run, model, path, validate=False)
    return get_backend(cfg.backend, path, device=cfg.device, threads=cfg.threads)


def _export(run: Run, model, path: Path, validate: bool = True, fmt: str = "onnx"):
    from compressor.export.pipeline import export_model

    status(f"exporting to {path.name} ({fmt})")
    shutil.rmtree(path, ignore_errors=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary = export_model(model, run.tokenizer, tmp, format=fmt, validate=validate, threads=run.cfg.threads)
    tmp.rename(path)
    return summary


def _workload_ms(result) -> float:
    """Latency of one workload request from a bench result: prefill p50 + new tokens x decode p50."""
    from compressor.evaluate import workload_latency_ms

    new_tokens = result.timing["workload_new_tokens"]
    return workload_latency_ms(result.prefill[0]["p50_ms"], result.decode[0]["p50_ms"], new_tokens)


def _bench_pair(run: Run, a, b, perplexity: bool = False):
    """Benchmark two backends in alternation on the workload's shapes; returns (A, B) results."""
    from compressor.evaluate import BenchConfig, TimingConfig, benchmark

    cfg = run.cfg
    config = BenchConfig(prefill=f"{cfg.batch}x{cfg.prefill_tokens}",
                         decode=f"{cfg.batch}x{cfg.prefill_tokens}+{min(32, cfg.new_tokens)}",
                         timing=TimingConfig(min_seconds=cfg.timing_seconds), perplexity=perplexity)
    ra, rb = benchmark([a, b], ["original", "compressed"], config, run.tokenizer)
    for r in (ra, rb):
        r.timing["workload_new_tokens"] = cfg.new_tokens
    return ra, rb


def _blocks_for_target(run: Run) -> dict:
    """Fewest blocks whose removal reaches the target speedup, *measured* on the backend.

    A first guess from parameter counts (the LM head does not shrink with depth) is measured
    first: a copy with that many blocks removed, spread over the depth, exported and timed
    against the original in alternation. That pair fits the latency model (fixed + per-block cost
    on this backend and device), which refuses an unreachable target with its ceiling and makes
    the next guess; then each probe corrects the per-block gain from its own measurement (a secant
    step) within the gap between the deepest depth that fell short and the shallowest that reached
    the target, so the search goes both ways. At most `max_probes` probes, the first included.
    """
    from compressor.evaluate import LatencyModel
    from compressor.evaluate.latency_model import shallow_copy_without, spread_blocks

    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    first_guess = _parameter_guess(run.model, n, cfg.target_speedup)
    original = _backend(run, run.model, "probe-original")
    attempts: list[dict] = []
    pairs: dict[int, tuple] = {}
    latency_model: LatencyModel | None = None

    def measure(k: int) -> float:
        if k not in pairs:
            probe = _backend(run, shallow_copy_without(run.model, spread_blocks(n, k)), f"probe-{k}")
            pairs[k] = _bench_pair(run, original, probe)
        ra, rb = pairs[k]
        measured = _workload_ms(ra) / _workload_ms(rb)
        predicted = latency_model.predict_speedup(k) if latency_model else None
        attempts.append({"blocks_removed": k, "predicted": predicted, "measured": measured,
                         "latency_ms": [_workload_ms(ra), _workload_ms(rb)]})
        status(f"{k} blocks removed: {measured:.3f}x measured"
               + (f" ({predicted:.3f}x predicted)" if predicted else ""))
        return measured

    status(f"measuring the latency model on {cfg.backend}/{cfg.device}")
    model_info = run.cached("latency_model", lambda: _latency_model(run, n, first_guess, measure, pairs))
    latency_model = LatencyModel.from_dict(model_info)
    first = latency_model.blocks_for_speedup(cfg.target_speedup)  # raises, with the ceiling, if out of reach
    first = min(max(first, 1), n - 1)
    for attempt in attempts:  # the latency model's own probe counts as the search's first measurement
        attempt["predicted"] = latency_model.predict_speedup(attempt["blocks_removed"])
    known = {k: _workload_ms(ra) / _workload_ms(rb) for k, (ra, rb) in pairs.items()}
    reached = search_depth(first, measure, cfg.target_speedup * (1 + cfg.speedup_margin), n, cfg.max_probes, known)
    if reached is not None:
        return {"k": reached, "attempts": attempts}
    best = max(attempts, key=lambda a: a["measured"])
    raise InvalidPlanError(
        f"a {cfg.target_speedup:.2f}x speedup was not reached on {cfg.backend}/{cfg.device}: the best measured "
        f"was {best['measured']:.3f}x with {best['blocks_removed']} blocks removed ({latency_model.explain()}); "
        "ask for less")


def _parameter_guess(model, n: int, target: float) -> int:
    """Blocks to remove for `target` if time were proportional to the parameters each token passes
    through: every block, plus the LM head, which never shrinks (embeddings are a lookup)."""
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    blocks = get_adapter(model).blocks_of(model)
    block_params = sum(p.numel() for p in blocks.parameters())
    fixed = head_params / max(head_params + block_params, 1)
    if 1 / target <= fixed:
        return max(1, n // 2)  # out of reach by this estimate: measure half the depth, the fit will say
    return min(n - 1, max(1, math.ceil(n * (1 - (1 / target - fixed) / (1 - fixed)) - 1e-9)))


def search_depth(first: int, measure, target: float, n: int, max_probes: int = 4,
                 known: dict[int, float] | None = None, trust: float = 0.02) -> int | None:
    """The fewest blocks (of n) whose measured speedup `measure(k)` reaches `target`, starting from
    the guess `first`; None if no probed depth reached it. Each measurement corrects the per-block
    gain (a secant step through 0 blocks = 1.0x), and the next probe lies between the deepest depth
    that fell short and the shallowest that reached the target, so the search goes both ways.
    `known` holds depths measured before the search (they bound it and count as probes).

    The depth just below the shallowest that reached the target is not measured when the secant
    through that measurement predicts it falls short by more than `trust` (a fraction of the target):
    the fitted latency model is within about 1 % on the backends measured, so such a probe would only
    confirm the miss, at the price of an export and a benchmark."""
    known = dict(known or {})
    short = max((k for k, v in known.items() if v < target), default=0)
    reached = min((k for k, v in known.items() if v >= target), default=None)
    upper = (reached - 1) if reached is not None else n - 1
    if short + 1 > upper:
        return reached
    k = min(max(first, short + 1), upper)
    for _ in range(max_probes - len(known)):
        known[k] = measure(k)
        if known[k] >= target:
            reached = k if reached is None else min(reached, k)
        else:
            short = max(short, k)
        upper = (reached - 1) if reached is not None else n - 1
        guess = _secant_guess(k, known[k], target)
        if short + 1 > upper:
            break  # the depths on both sides of the target are measured
        k = min(max(guess, short + 1), upper)  # a guess at or past `reached` checks the depth just below it
        if reached is not None and k == reached - 1:
            predicted = 1 / (1 - _saved_per_block(reached, known[reached]) * k)
            if predicted < target / (1 + trust):
                log.info("%d blocks would give about %.3fx, short of %.3fx: not measured", k, predicted, target)
                break
    return reached


def _saved_per_block(k: int, measured: float) -> float:
    """The latency fraction saved per block, if latency fell linearly with depth from 0 to k blocks."""
    return (1 - 1 / measured) / k


def _secant_guess(k: int, measured: float, target: float) -> int:
    """Blocks to remove for `target`, if latency falls linearly with depth as it did from 0 to k blocks."""
    per_block = _saved_per_block(k, measured)
    if per_block <= 0:
        return k + 1
    return math.ceil((1 - 1 / target) / per_block - 1e-9)


def _latency_model(run: Run, n: int, k: int, measure, pairs: dict) -> dict:
    """Fixed and per-block cost on the target backend, from the full model and k blocks removed."""
    from compressor.evaluate import Workload, fit_latency_model

    cfg = run.cfg
    measure(k)
    ra, rb = pairs[k]
    result = fit_latency_model(
        [(n, ra.prefill[0]["p50_ms"]), (n - k, rb.prefill[0]["p50_ms"])],
        [(n, ra.decode[0]["p50_ms"]), (n - k, rb.decode[0]["p50_ms"])],
        n, Workload(cfg.prefill_tokens, cfg.new_tokens, cfg.batch), cfg.backend, cfg.device,
        versions=ra.versions, settings=ra.settings)
    log.info("latency model: %s", result.explain())
    return result.to_dict()


def _select_settings(run: Run):
    from compressor.select import SelectSettings

    return SelectSettings(search_windows=run.cfg.search_windows or None)


def _plan_stage(run: Run, windows, eval_sets, k: int | None, profile: dict):
    """The plan (cached in the work directory as plan.json with its maps, for resumption)."""
    from compressor.plan import read_plan, write_plan

    path, stage = run.work / "plan.json", run.work / "plan.stage.json"
    key = run.cfg.key(*STAGE_INPUTS["plan"])
    if path.is_file() and stage.is_file():
        stored = json.loads(stage.read_text())
        if stored.get("key") == key:
            log.info("resuming: plan from %s", path)
            return read_plan(path), stored["result"]["perplexity"]
    start = time.perf_counter()
    plan, ppl = _choose_plan(run, windows, eval_sets, k, profile)
    run.seconds["plan"] = round(time.perf_counter() - start, 2)
    write_plan(plan, path)
    write_json(stage, {"key": key, "result": {"perplexity": ppl}})
    return plan, ppl


def _choose_plan(run: Run, windows, eval_sets, k: int | None, profile: dict):
    """The plan for K blocks; under a perplexity budget, the largest K within it.

    Under a budget one search serves every K (measured strategies search once, to the deepest
    level), and the maps are fitted only for the plans whose perplexity is looked at.
    """
    from compressor.calibrate import Profile
    from compressor.plan import apply_plan_
    from compressor.select import make_plan, search_plans

    cfg = run.cfg
    prof = Profile.from_dict(profile)
    if k is not None:
        status(f"planning the removal of {k} blocks ({cfg.strategy})")
        return make_plan(run.model, windows, k, cfg.strategy, profile=prof, settings=_select_settings(run)), None
    baseline = _perplexities(run.model, eval_sets)
    budget = {name: ppl * (1 + cfg.max_ppl_increase) for name, ppl in baseline.items()}
    n = get_adapter(run.model).num_blocks(run.model)
    deepest = max(1, n // 2)  # beyond half the depth no training-free plan keeps perplexity near the original
    found = search_plans(run.model, windows, list(range(1, deepest + 1)), cfg.strategy, prof, _select_settings(run))
    best, best_ppl = None, None
    for count in range(1, deepest + 1):
        plan = found[(count, True)]()
        candidate = copy.deepcopy(run.model)
        apply_plan_(candidate, plan)
        ppl = _perplexities(candidate, eval_sets)
        status(f"{count} blocks removed: perplexity " + ", ".join(f"{v:.2f} (budget {budget[n_]:.2f})"
                                                               for n_, v in ppl.items()))
        if any(ppl[name] > budget[name] for name in ppl):
            break
        best, best_ppl = plan, ppl
    if best is None:
        raise InvalidPlanError(
            f"removing even one block exceeds the perplexity budget of +{cfg.max_ppl_increase:.0%}: "
            "allow a larger increase")
    return best, best_ppl


def _sweep(run: Run, windows, eval_sets, profile: dict) -> list[dict]:
    """Training-free points at several depths: plan (one search), perplexity, measured latency."""
    from compressor.calibrate import Profile
    from compressor.plan import apply_plan_
    from compressor.select import search_plans

    cfg = run.cfg
    n = get_adapter(run.model).num_blocks(run.model)
    levels = sorted({min(n - 1, round(level * n)) for level in cfg.sweep})
    ks = [k for k in levels if k > 0]
    found = search_plans(run.model, windows, ks, cfg.strategy, Profile.from_dict(profile),
                         _select_settings(run)) if ks else {}
    original = _backend(run, run.model, "probe-original")
    points = []
    for k in levels:
        status(f"sweep: {k} of {n} blocks removed")
        if k == 0:
            model, drop = run.model, []
        else:
            plan = found[(k, True)]()
            model, drop = copy.deepcopy(run.model), plan.drop
            apply_plan_(model, plan)
        ra, rb = _bench_pair(run, original, _backend(run, model, "probe-original" if k == 0 else f"probe-sweep-{k}"))
        points.append({"blocks_removed": k, "fraction": k / n, "drop": drop,
                       "latency_ms": _workload_ms(rb), "original_latency_ms": _workload_ms(ra),
                       "speedup": _workload_ms(ra) / _workload_ms(rb), "perplexity": _perplexities(model, eval_sets),
                       "healed": False})
    return points


def _perplexities(model, eval_sets: dict) -> dict:
    from compressor.evaluate import perplexity

    return {name: perplexity(model, ids, max_length=512, stride=256).perplexity for name, ids in eval_sets.items()}


def _heal(run: Run, student, windows) -> dict | None:
    cfg = run.cfg
    if cfg.heal_steps <= 0:
        return None
    from compressor.heal import HealConfig, heal

    status(f"healing ({cfg.heal_steps} steps, at most {cfg.heal_minutes} min)")
    state = run.work / f"heal-state-{cfg.key(*STAGE_INPUTS['heal'])}"
    config = HealConfig(steps=cfg.heal_steps, max_minutes=cfg.heal_minutes, train=cfg.heal_train, lr=cfg.heal_lr,
                        checkpoint_dir=state, resume=state.exists())
    start = time.perf_counter()
    result = heal(student, run.model, windows, None, config)
    run.seconds["heal"] = round(time.perf_counter() - start, 2)
    return result.to_dict() if hasattr(result, "to_dict") else asdict(result)


def _save(run: Run, model, path: Path) -> None:
    from compressor.surgery import save_checkpoint

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, run.tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _exports(run: Run, compressed) -> dict:
    cfg = run.cfg
    exports = {}
    if cfg.format != "none":
        summary = _export(run, compressed, run.work / cfg.format, validate=True, fmt=cfg.format)
        exports[cfg.format] = summary.to_dict()
    return exports


def _finish(run: Run, plan, compressed, eval_sets, pruned_ppl, heal_info, checkpoint, exports, attempts,
            profile, plan_ppl, sweep=None) -> dict:
    from compressor.report import write_reports

    cfg = run.cfg
    status("benchmarking original and compressed side by side")
    original_backend = _backend(run, run.model, "probe-original")
    final_path = run.work / cfg.format if cfg.format == "onnx" and cfg.backend == "onnxruntime" else None
    if final_path is not None:
        from compressor.evaluate import get_backend

        compressed_backend = get_backend(cfg.backend, final_path, device=cfg.device, threads=cfg.threads)
    else:
        compressed_backend = _backend(run, compressed, "probe-final")
    ra, rb = _bench_pair(run, original_backend, compressed_backend)
    original_ppl = _perplexities(run.model, eval_sets)
    compressed_ppl = _perplexities(compressed, eval_sets)
    speedup = _workload_ms(ra) / _workload_ms(rb)
    report = {
        "tool": f"compressor {__version__}",
        "model": str(cfg.model),
        "model_source": str(run.source),
        "target_speedup": cfg.target_speedup,
        "max_ppl_increase": cfg.max_ppl_increase,
        "speedup_measured": speedup,
        "target_met": (speedup >= cfg.target_speedup) if cfg.target_speedup else
        all(compressed_ppl[n] <= original_ppl[n] * (1 + cfg.max_ppl_increase) for n in original_ppl),
        "blocks_original": plan.blocks_original,
        "blocks_removed": plan.drop,
        "blocks_linearized": plan.linearize,
        "perplexity": {"original": original_ppl, "pruned_before_heal": pruned_ppl, "compressed": compressed_ppl},
        "perplexity_increase": {n: compressed_ppl[n] / original_ppl[n] - 1 for n in original_ppl},
        "latency": {"original": ra.to_dict(), "compressed": rb.to_dict()},
        "workload": f"batch {cfg.batch}: prefill {cfg.prefill_tokens} + {cfg.new_tokens} decoded tokens",
        "workload_latency_ms": {"original": _workload_ms(ra), "compressed": _workload_ms(rb)},
        "backend": {"name": cfg.backend, "device": cfg.device, "threads": cfg.threads or torch.get_num_threads(),
                    "versions": ra.versions},
        "parameters": {"original": count_parameters(run.model), "compressed": count_parameters(compressed)},
        "size_bytes": {"original": dir_size(run.source) if isinstance(run.source, Path) else None,
                       "compressed": dir_size(checkpoint)},
        "plan": {**plan.to_dict(), "summary": plan.summary()} if hasattr(plan, "to_dict") else plan.summary(),
        "attempts": attempts,
        "heal": heal_info,
        "exports": exports,
        "settings": {k: str(v) if isinstance(v, (Path, tuple)) else v for k, v in asdict(cfg).items()},
        "seconds": run.seconds,
        "notes": run.notes + _notes(plan, ra),
        "tradeoff": _tradeoff(original_ppl, pruned_ppl, compressed_ppl, ra, rb),
        "sweep": sweep,
        "artifacts": {"checkpoint": str(checkpoint), **{f: str(run.work / f) for f in exports},
                      "profile": str(run.work / "profile.json"), "report_json": str(run.work / "report.json"),
                      "report_md": str(run.work / "report.md"), "report_html": str(run.work / "report.html")},
    }
    if report["size_bytes"]["original"] is None:
        report["size_bytes"] = {}
    write_reports(report, run.work, profile)
    write_json(run.work / "profile.json", profile)
    return report


def _notes(plan, result) -> list[str]:
    notes = []
    if plan.provenance.get("note"):
        notes.append(plan.provenance["note"])
    return notes


def _tradeoff(original_ppl, pruned_ppl, compressed_ppl, ra, rb) -> list[dict]:
    name = next(iter(original_ppl))
    lo, lc = _workload_ms(ra), _workload_ms(rb)
    points = [{"label": "original", "latency_ms": lo, "perplexity": original_ppl[name]},
              {"label": "pruned (before healing)", "latency_ms": lc, "perplexity": pruned_ppl[name]},
              {"label": "compressed", "latency_ms": lc, "perplexity": compressed_ppl[name]}]
    return [p for p in points if math.isfinite(p["perplexity"])]


def _rewrite_reports(report: dict, out: Path) -> None:
    from compressor.report import write_reports

    profile = json.loads((out / "profile.json").read_text())
    write_reports(report, out, profile)
