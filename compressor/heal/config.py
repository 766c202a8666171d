"""What a healing run is asked to do (HealConfig) and what it did (HealResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from compressor.errors import CompressorError

TRAIN_CHOICES = ("touched", "all", "norms", "lora")
HIDDEN_AT_CHOICES = ("cuts", "every")
# Peak learning rates that recovered most per CPU-minute on SmolLM2-135M (bench/heal.py): a few blocks or
# adapters take a high rate; the whole model a lower one.
DEFAULT_LR = {"touched": 1e-3, "lora": 1e-3, "all": 2e-4, "norms": 3e-3}
# The share of a --train touched run spent first on local reconstruction (bench/heal_recipes.py: on SmolLM2
# with 6 blocks removed it recovered more in the same minutes, in-domain and on another source).
DEFAULT_LOCAL = 0.5
# The weight of KD against the next-token loss (bench/heal_recipes.py, 12 minutes on SmolLM2 with 6 blocks removed,
# one run: alpha 0.5 recovered 73% in-domain / 67% on another source, 0.8 69% / 65%; KD alone, 61% / 61%).
DEFAULT_ALPHA = 0.5
DISTRIBUTED_CHOICES = ("ddp", "fsdp")
QUANTIZATION_AWARE_CHOICES = ("int4", "int8")


@dataclass
class HealConfig:
    """Settings of one healing run. The loss is

        alpha * KD + (1 - alpha) * LM + hidden_weight * hidden + regularize_linearity * mean cos

    KD is KL(teacher || student) at `temperature` (times T^2), LM the next-token cross-entropy, hidden
    the relative error of the student's hidden states against the teacher's (at each cut, or after
    every kept block: `hidden_at`), and the last term the cosine regularizer (see LinearityRegularizer).

    steps: optimizer steps planned; max_minutes bounds wall time too (whichever comes first: the
        schedule is re-planned to end within the time after the first steps are timed).
    batch_size: windows per micro-batch per process; one step sees batch_size * grad_accum * processes.
    lr: peak learning rate; None picks DEFAULT_LR for the `train` mode.
    alpha: the weight of KD against the next-token loss; None takes DEFAULT_ALPHA.
    warmup: linear warm-up steps, then cosine decay to min_lr_ratio * lr.
    local: the share of the run spent first on local reconstruction (compressor.heal.local): the
        touched blocks alone, trained to reproduce the teacher's hidden states after them, for local x
        the time max_minutes leaves after the teacher's pass or local x steps x 10 cheap local steps,
        whichever comes first; needs train "touched". 0 skips it; None takes DEFAULT_LOCAL with train
        "touched", 0 otherwise.
    train: "touched" (blocks next to each cut), "all", "norms" (normalization scales and biases), or
        "lora" (peft, merged back at the end).
    reach: with train "touched", the kept blocks trained on each side of a cut (1: the neighbours).
    topk: log-probabilities per position kept in the teacher cache.
    teacher_cache: directory of cache files; None runs the teacher live on every batch.
    checkpoint_dir: where training state is saved every checkpoint_every steps (None: never).
    resume: continue from the state in checkpoint_dir, with the same schedule.
    distributed: "ddp" or "fsdp" when launched with torchrun/accelerate launch (ignored alone).
    autocast: train in bfloat16 autocast where the device computes it natively (CUDA; CPUs with
        AVX512-BF16 or AMX, where a SmolLM2 step is about 1.6x faster than fp32). Weights, optimizer
        state and evaluation stay fp32.
    quantization_aware: None, or "int4" / "int8": train through the fake-quantized weights that
        `compress export --precision` of that name writes (compressor.heal.quantaware); the record
        goes into model.config, so the export writes the trained integers.
    """

    steps: int = 200
    max_minutes: float | None = None
    lr: float | None = None
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    temperature: float = 1.0
    alpha: float | None = None
    hidden_weight: float = 0.0
    hidden_at: str = "cuts"
    local: float | None = None
    regularize_linearity: float = 0.0
    train: str = "touched"
    reach: int = 1
    lora_rank: int = 16
    lora_alpha: float | None = None
    topk: int = 64
    teacher_cache: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    device: str | None = None
    autocast: bool = True
    distributed: str = "ddp"
    log_every: int = 10
    eval_batch_size: int = 8
    quantization_aware: str | None = None

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.train, DEFAULT_LR["all"])
        if self.local is None:
            self.local = DEFAULT_LOCAL if self.train == "touched" else 0.0
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA

    def problems(self) -> list[str]:
        """Every problem with these settings at once (empty when they are usable)."""
        p = []
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lr": self.lr, "temperature": self.temperature, "topk": self.topk,
                    "lora_rank": self.lora_rank, "checkpoint_every": self.checkpoint_every,
                    "log_every": self.log_every, "eval_batch_size": self.eval_batch_size}
        p += [f"--{k.replace('_', '-')} must be positive (got {v})" for k, v in positive.items() if v <= 0]
        if not 0.0 <= self.alpha <= 1.0:
            p.append(f"--alpha weighs KD against LM and must be in [0, 1] (got {self.alpha})")
        if self.warmup < 0:
            p.append(f"--warmup must be >= 0 (got {self.warmup})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.hidden_weight < 0:
            p.append(f"--hidden-weight must be >= 0 (got {self.hidden_weight})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            p.append(f"--max-minutes must be positive (got {self.max_minutes})")
        if not 0.0 <= self.local < 1.0:
            p.append(f"--local is the share of the time spent on local reconstruction first, in [0, 1) "
                     f"(got {self.local})")
        elif self.local > 0 and self.train != "touched":
            p.append("--local trains the blocks next to the cuts alone: it needs --train touched")
        if self.hidden_at not in HIDDEN_AT_CHOICES:
            p.append(f"--hidden-at must be one of {', '.join(HIDDEN_AT_CHOICES)} (got '{self.hidden_at}')")
        if self.reach < 1:
            p.append(f"--reach is the number of kept blocks trained on each side of a cut, at least 1 (got {self.reach})")
        if self.train not in TRAIN_CHOICES:
            p.append(f"--train must be one of {', '.join(TRAIN_CHOICES)} (got '{self.train}')")
        if self.distributed not in DISTRIBUTED_CHOICES:
            choices = ", ".join(DISTRIBUTED_CHOICES)
            p.append(f"--distributed must be one of {choices} (got '{self.distributed}')")
        p += self._quantization_aware_problems()
        if self.resume and self.checkpoint_dir is None:
            p.append("resuming needs a checkpoint directory")
        return p

    def _quantization_aware_problems(self) -> list[str]:
        if self.quantization_aware is None:
            return []
        if self.quantization_aware not in QUANTIZATION_AWARE_CHOICES:
            choices = " or ".join(QUANTIZATION_AWARE_CHOICES)
            return [f"--quantization-aware must be {choices} (got '{self.quantization_aware}')"]
        p = []
        if self.train == "lora":
            p.append("--quantization-aware trains the weights the export rounds, which LoRA leaves frozen: "
                     "use --train all or touched")
        if self.distributed == "fsdp":
            p.append("--quantization-aware is not supported under FSDP: use --distributed ddp")
        return p

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise CompressorError("invalid healing settings: " + "; ".join(problems))

    def schedule_key(self, world_size: int = 1) -> dict:
        """The settings a resumed run must share with the interrupted one to continue its schedule.

        The global batch counts, not how it is split: a run saved on 2 ranks of 2 windows resumes on
        one process of 4.
        """
        keys = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "temperature", "alpha",
                "hidden_weight", "hidden_at", "local", "regularize_linearity", "train", "lora_rank", "lora_alpha", "topk", "seed",
                "quantization_aware")
        key = {k: getattr(self, k) for k in keys}
        key["global_batch"] = self.batch_size * self.grad_accum * world_size
        return key

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class HealResult:
    """What a healing run did. `model` is the healed student (same object as passed in, in eval mode)."""

    steps: int
    planned_steps: int
    stopped_by: str
    tokens: int
    seconds: float
    tokens_per_second: float
    trainable_parameters: int
    loss_first: float | None
    loss_last: float | None
    ppl_before: float | None = None
    ppl_after: float | None = None
    resumed_from: int | None = None
    teacher_cache: str | None = None
    world_size: int = 1
    precision: str = "float32"
    history: list[dict] = field(default_factory=list)
    model: object = field(default=None, repr=False)
    full_state_dict: dict | None = field(default=None, repr=False)
    is_main: bool = True
    quantization_aware: dict | None = None  # the record (compressor.quantize.fake) the export follows
    local: dict | None = None  # what local reconstruction did first (compressor.heal.local), if it ran

    def to_dict(self) -> dict:
        skip = {"model", "full_state_dict", "is_main"}
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
