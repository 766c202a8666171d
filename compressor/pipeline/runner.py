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
from compressor.util.fingerprint import content_signature, model_fingerprint
from compressor.util.io import write_json

log = logging.getLogger(__name__)

# Latency probes, training state and the runner's own bookkeeping: not what a user ships.
SCRATCH = ("probe-*", "heal-state-*", "*.tmp", "*.stage.json", "settings.json")


def inputs_of(cls, cfg: PipelineConfig, **given):
    """The stage inputs `cls` with each field taken from the setting of the same name (or `given`)."""
    return cls(**{f.name: given[f.name] if f.name in given else getattr(cfg, f.name) for f in fields(cls)})


def key_of(inputs) -> str:
    """A short hash of a stage's inputs (a dataclass); its class name is part of it. A path counts by its
    content too (size and modification time of each file), so an edited --data file is not reused."""
    data = {"stage": type(inputs).__name__, **asdict(inputs)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=json_default).encode()).hexdigest()[:16]


def json_default(value):
    """JSON for what json cannot write: a path with its content signature, anything else as text."""
    if isinstance(value, Path):
        return {"path": str(value), "content": content_signature(value)}
    return str(value)


@dataclass
class Runner:
    """Stage caching in `work`, and how long each computed stage took."""

    work: Path
    seconds: dict[str, float] = field(default_factory=dict)
    started: bool = False  # a stage has run (or resumed): from then on a failure keeps the work
    persistent: bool = True  # False: a run without `out`, which writes nothing, not even to the cache

    def cached(self, name: str, inputs, compute, requires: tuple[str, ...] = ()):
        """`compute()`'s JSON result, stored as NAME.stage.json; reused while `inputs` are unchanged and
        the files in `requires` (written by compute) are there."""
        self.started = True
        path = self.work / f"{name}.stage.json"
        key = key_of(inputs)
        if path.is_file() and all((self.work / f).exists() for f in requires):
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                if name not in self.seconds:  # computed by this run: no news
                    log.info("resuming: %s from %s", name, path)
                return stored["result"]
        start = time.perf_counter()
        result = compute()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        write_json(path, {"key": key, "result": result})
        return result

    def prepare(self, model_label: str, settings: dict, fresh: bool = False) -> None:
        """Reuse the work directory of an earlier run of the same model (same name and, for a file or
        directory, the same content); start afresh otherwise."""
        stamp = self.work / "settings.json"
        identity = model_fingerprint(model_label)
        stored = json.loads(stamp.read_text()) if stamp.is_file() else {}
        stale = (stored.get("model"), stored.get("identity")) != (model_label, identity)
        if self.work.exists() and (fresh or stale):
            shutil.rmtree(self.work)  # everything in it derives from the model; the rest is keyed per stage
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"model": model_label, "identity": identity, "settings": settings})

    def deliver(self, out: Path) -> None:
        """Drop the scratch and bookkeeping and move the work directory to `out` (replacing it): `out` holds
        the checkpoint, the export, the reports, the plan and the profile."""
        for pattern in SCRATCH:
            for scratch in self.work.glob(pattern):
                if scratch.is_dir():
                    shutil.rmtree(scratch, ignore_errors=True)
                else:
                    scratch.unlink(missing_ok=True)
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
    plans: dict = field(default_factory=dict)  # depths searched together -> their PlanSearch, and each plan by its
                                               # cache entry (plan.plans_for, plan.cached_plan)
    backends: list = field(default_factory=list)  # every backend the stages opened; closed when the run ends
    reused_timings: list = field(default_factory=list)  # probes timed by an earlier run (pipeline.timings)
    _content_id: str | None = None

    def content_id(self) -> str:
        """The original model's content fingerprint (computed once): what the caches shared across runs key on."""
        if self._content_id is None:
            try:
                self._content_id = model_fingerprint(self.model)
            except (RuntimeError, NotImplementedError):  # weights not in memory (offloaded to meta): its source's
                self._content_id = model_fingerprint(self.source if self.source is not None else self.cfg.model)
        return self._content_id

    def close_backends(self) -> None:
        """Close what the stages opened (a torch backend holds the process's thread count until closed)."""
        while self.backends:
            self.backends.pop().close()

    @property
    def work(self) -> Path:
        return self.runner.work
