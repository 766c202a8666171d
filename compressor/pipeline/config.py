"""The settings of one `compress` run, and their validation (every problem at once, before any work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError
from compressor.export.run import FORMATS

# What a model is exported to before a backend can time it.
EXPORT_FOR_BACKEND = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}


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
    heal_local: float | None = None   # share of healing spent on local reconstruction first (HealConfig.local;
                                      # None: its default for heal_train)
    heal_quantization_aware: bool = False  # heal through the chosen int8/int4 export's fake quantizer
    format: str = "onnx"
    precision: str = "auto"           # auto: measured, with the depth (pipeline.precision); or one pinned
    max_probes: int = 4               # measured depths when confirming the target speedup
    speedup_margin: float = 0.02      # a probe must reach target x (1 + margin): repeated measurements of
                                      # one pair vary by about 1-2 %, and the final benchmark is another one
    eval_max_tokens: int = 8192
    timing_seconds: float = 2.0
    fresh_timings: bool = False       # measure every probe again instead of reusing the timing cache (pipeline.timings)
    search_windows: int = 16          # auto: windows its maps are fitted on during the search (cost bound)
    sweep: tuple[float, ...] = ()     # fractions of the blocks to remove for the extra sweep points


def validate(cfg: PipelineConfig) -> None:
    """Every problem with the settings at once, then the optional dependencies the run will need."""
    problems = _problems(cfg)
    if problems:
        raise CompressorError("; ".join(problems))
    if "tensorrt" in (cfg.format, cfg.backend):
        from compressor.export.tensorrt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda("TensorRT")
    if cfg.format != "none" or cfg.backend in EXPORT_FOR_BACKEND:
        from compressor.errors import require

        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "onnx", "exporting to ONNX")


def _problems(cfg: PipelineConfig) -> list[str]:
    from compressor.evaluate import backend_names
    from compressor.heal.config import TRAIN_CHOICES
    from compressor.select import STRATEGIES

    problems = _device_problem(cfg.device)
    if (cfg.target_speedup is None) == (cfg.max_ppl_increase is None):
        problems.append("give exactly one of --target-speedup or --max-ppl-increase")
    if cfg.target_speedup is not None and not cfg.target_speedup > 1:
        problems.append(f"--target-speedup must be above 1 (got {cfg.target_speedup})")
    if cfg.max_ppl_increase is not None and not cfg.max_ppl_increase > 0:
        problems.append(f"--max-ppl-increase must be positive (got {cfg.max_ppl_increase:.0%})")
    if any(not 0 <= level < 1 for level in cfg.sweep):
        problems.append(f"--sweep levels are percentages of the blocks from 0 up to (not including) 100: "
                        f"got {', '.join(f'{level:.0%}' for level in cfg.sweep)}")
    if cfg.strategy not in STRATEGIES:
        problems.append(f"unknown strategy '{cfg.strategy}': choose one of {', '.join(STRATEGIES)}")
    if min(cfg.batch, cfg.prefill_tokens, cfg.new_tokens) < 1:
        problems.append(f"--workload needs a batch, prefill and new tokens of 1 or more each (got "
                        f"{cfg.batch}x{cfg.prefill_tokens}+{cfg.new_tokens}): e.g. 1x512+128")
    if cfg.threads is not None and cfg.threads < 1:
        problems.append(f"--threads must be 1 or more (got {cfg.threads}): leave it out to use every core")
    if cfg.search_windows < 0:
        problems.append(f"--search-windows must be 0 (all windows) or more (got {cfg.search_windows})")
    if cfg.eval_max_tokens < 2:
        problems.append(f"--eval-tokens must be 2 or more: perplexity scores each token after the first "
                        f"(got {cfg.eval_max_tokens})")
    if cfg.backend not in backend_names():
        problems.append(f"unknown backend '{cfg.backend}': choose one of {', '.join(backend_names())}")
    if cfg.format not in (*FORMATS, "none"):
        problems.append(f"unknown format '{cfg.format}': choose one of {', '.join(FORMATS)}, none")
    problems += _precision_problems(cfg)
    if cfg.heal_quantization_aware and cfg.heal_train == "lora":
        problems.append("--heal-quantization-aware trains the quantized weights themselves: use --heal-train "
                        "touched or all, not lora")
    if cfg.heal_quantization_aware and cfg.precision == "fp32":
        problems.append("--heal-quantization-aware needs an int8 or int4 export: --precision auto, int8 or int4")
    if cfg.heal_train not in TRAIN_CHOICES:
        problems.append(f"--heal-train must be one of {', '.join(TRAIN_CHOICES)} (got '{cfg.heal_train}')")
    if cfg.heal_local is not None and not 0.0 <= cfg.heal_local < 1.0:
        problems.append(f"--heal-local must be in [0, 1) (got {cfg.heal_local})")
    elif cfg.heal_local and cfg.heal_train != "touched":
        problems.append("--heal-local trains the blocks next to the cuts alone: it needs --heal-train touched "
                        "(or --heal-local 0)")
    if cfg.heal_lr is not None and not cfg.heal_lr > 0:
        problems.append(f"--heal-lr must be positive (got {cfg.heal_lr})")
    if not cfg.heal_minutes > 0:
        problems.append(f"--heal-minutes must be positive (got {cfg.heal_minutes})")
    for path in ([cfg.data] if cfg.data else []) + list(cfg.eval):
        if not Path(path).exists():
            problems.append(f"{path} does not exist")
    return problems


def _precision_problems(cfg: PipelineConfig) -> list[str]:
    from compressor.export.run import PRECISIONS
    from compressor.pipeline.precision import precision_problem

    if cfg.precision not in ("auto", *PRECISIONS):
        return [f"unknown precision '{cfg.precision}': choose auto or one of {', '.join(PRECISIONS)}"]
    problem = precision_problem(cfg.precision, cfg.backend, cfg.device, cfg.format)
    return [problem] if problem else []


def _device_problem(device: str) -> list[str]:
    """[why `device` cannot run here], or []; "auto" spreads the model with accelerate."""
    from compressor.evaluate.backends import check_device

    if device == "auto":
        return []
    try:
        check_device(device)
    except CompressorError as exc:
        return [str(exc)]
    return []
