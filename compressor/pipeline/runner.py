"""The one runner: stage results cached in a work directory, keyed by the stage's typed inputs.

Each stage declares the settings it depends on as a frozen dataclass whose field names are
PipelineConfig's (`inputs_of` fills it, and a misspelt name fails at once instead of silently
leaving a setting out of the key). A rerun with the same inputs reuses the stored result; every
file is written atomically, so an interrupted run never leaves a result a rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from compressor.pipeline.config import PipelineConfig
from compressor.util.io import write_json

log = logging.getLogger(__name__)

SCRATCH = ("probe-*", "heal-state-*", "*.tmp")  # latency probes and training state: not deliverables


def inputs_of(cls, cfg: PipelineConfig, **given):
    """The stage inputs `cls` with each field taken from the setting of the same name (or `given`)."""
    return cls(**{f.name: given[f.name] if f.name in given else getattr(cfg, f.name) for f in fields(cls)})


def key_of(inputs) -> str:
    """A short hash of a stage's inputs (a dataclass); its class name is part of it."""
    data = {"stage": type(inputs).__name__, **asdict(inputs)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Runner:
    """Stage caching in `work`, and how long each computed stage took."""

    work: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def cached(self, name: str, inputs, compute, requires: tuple[str, ...] = ()):
        """`compute()`'s JSON result, stored as NAME.stage.json; reused while `inputs` are unchanged and
        the files in `requires` (written by compute) are there."""
        path = self.work / f"{name}.stage.json"
        key = key_of(inputs)
        if path.is_file() and all((self.work / f).exists() for f in requires):
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                log.info("resuming: %s from %s", name, path)
                return stored["result"]
        start = time.perf_counter()
        result = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        write_json(path, {"key": key, "result": result})
        return result

    def prepare(self, model_label: str, settings: dict, fresh: bool = False) -> None:
        """Reuse the work directory of an earlier run of the same model; start afresh otherwise."""
        stamp = self.work / "settings.json"
        stale = not stamp.is_file() or json.loads(stamp.read_text()).get("model") != model_label
        if self.work.exists() and (fresh or stale):
            shutil.rmtree(self.work)  # everything in it derives from the model; the rest is keyed per stage
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"model": model_label, "settings": settings})

    def deliver(self, out: Path) -> None:
        """Drop the scratch and move the work directory to `out` (replacing it)."""
        for pattern in SCRATCH:
            for scratch in self.work.glob(pattern):
                shutil.rmtree(scratch, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        self.work.rename(out)

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@dataclass
class Run:
    """What the stages share: the settings, the runner, the loaded original model and where it came from."""

    cfg: PipelineConfig
    runner: Runner
    model: object
    tokenizer: object
    source: Path | str | None = None

    @property
    def work(self) -> Path:
        return self.runner.work
