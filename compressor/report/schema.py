"""The run report as a type: `Report` and its parts, what report.json holds (docs/REPORT.md has every key).

report.md, report.html and `compress report` read these objects, never raw dictionaries. `Report.from_dict`
reads the current schema and, tolerantly, the unversioned report.json files written before it (every key
they lack gets its empty default, and the Report it gives is in this schema); one that lacks what a
comparison needs, or comes from a newer schema, is refused with a DataError.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from compressor.errors import DataError

SCHEMA_VERSION = 1
KIND = "compressor run report"


@dataclass(kw_only=True)
class Pair:
    """One quantity for the original and the compressed model."""

    original: Any
    compressed: Any


@dataclass(kw_only=True)
class Perplexities:
    """Perplexity per evaluation text (name -> value) at the three points of a run."""

    original: dict[str, float]
    compressed: dict[str, float]
    pruned_before_heal: dict[str, float] = field(default_factory=dict)
    healed_full_precision: dict[str, float] = field(default_factory=dict)  # before a quantized export; {} at fp32


@dataclass(kw_only=True)
class BackendInfo:
    name: str | None = None
    device: str | None = None
    threads: int | None = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Attempt:
    """One depth measured while searching for the target speedup."""

    blocks_removed: int
    precision: str = "fp32"                                 # the blocks are removed on top of this precision
    predicted: float | None = None                          # by the latency model
    measured: float
    spread: float | None = None                             # relative: two standard errors, or the rounds' range
    rounds: list[float] = field(default_factory=list)      # every measurement of the pair, when repeated
    latency_ms: list[float] = field(default_factory=list)  # [original, with blocks removed]


@dataclass(kw_only=True)
class SweepPoint:
    """A training-free point of `--sweep`: a precision, blocks removed, its measured latency and perplexity."""

    precision: str = "fp32"
    blocks_removed: int
    fraction: float | None = None
    drop: list[int] = field(default_factory=list)
    latency_ms: float
    original_latency_ms: float | None = None
    speedup: float | None = None
    spread: float | None = None
    rounds: list[float] = field(default_factory=list)
    perplexity: dict[str, float]
    healed: bool = False


@dataclass(kw_only=True)
class Baseline:
    """A point the delivered model is compared with, or the delivered model itself: the unpruned model at
    one precision ("quantize-only"), blocks removed at fp32 ("depth-only", training-free; blocks_removed
    None when out of reach, with why in `note`), and the delivered combination ("chosen").
    latency_ms: the final benchmark's original latency over the point's own measured speedup.
    perplexity_at_least: a lower bound, where the point was not scored (`perplexity` is then empty)."""

    kind: str
    precision: str
    blocks_removed: int | None
    speedup: float | None = None
    spread: float | None = None     # relative
    latency_ms: float | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    healed: bool = False
    note: str = ""
    perplexity_at_least: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class TradeoffPoint:
    label: str
    latency_ms: float
    perplexity: float


@dataclass(kw_only=True)
class Report:
    """Everything one `compress model` run measured, in report.json's key order."""

    schema_version: int = SCHEMA_VERSION
    tool: str = ""
    model: str = ""
    model_source: str | None = None
    target_speedup: float | None = None
    max_ppl_increase: float | None = None
    speedup_measured: float | None = None
    speedup_spread: float | None = None         # relative: two standard errors, or half the rounds' range
    precision: str = "fp32"                     # of the delivered export
    target_met: bool | None = None              # False only when missed by more than the measured spread
    target_verdict: str | None = None           # "met", "within the noise" (Speedup.against) or "missed"
    blocks_original: int
    blocks_removed: list[int]
    blocks_linearized: list[dict] = field(default_factory=list)
    perplexity: Perplexities
    perplexity_increase: dict[str, float] = field(default_factory=dict)
    latency: Pair | None = None                 # BenchResult dictionaries (compressor.evaluate)
    workload: str = ""
    workload_latency_ms: Pair
    backend: BackendInfo = field(default_factory=BackendInfo)
    parameters: Pair | None = None
    size_bytes: Pair | None = None              # None when the original is not a local directory
    plan: dict = field(default_factory=dict)    # Plan.to_dict() plus its one-line "summary"
    attempts: list[Attempt] = field(default_factory=list)
    heal: dict | None = None                    # HealResult.to_dict(), None without healing
    exports: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings_reused: list[dict] = field(default_factory=list)  # probes from the timing cache: {probe, measured_at}
    tradeoff: list[TradeoffPoint] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)
    choice: dict = field(default_factory=dict)  # every precision x depth candidate and the depths searched
    sweep: list[SweepPoint] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "the report") -> Report:
        """A Report from report.json's contents (this schema or an unversioned older one)."""
        if not isinstance(data, dict):
            raise DataError(f"{where} is not a compress model report (not a JSON object)")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise DataError(f"{where} has report schema {version!r}, newer than this compressor reads "
                            f"({SCHEMA_VERSION}): upgrade compressor")
        missing = [k for k in ("blocks_original", "blocks_removed", "perplexity", "workload_latency_ms")
                   if k not in data]
        if missing:
            raise DataError(f"{where} is not a compress model report (missing {', '.join(missing)})")
        return cls(**{**_known(cls, data), "schema_version": SCHEMA_VERSION,  # read into this schema
                      "perplexity": _perplexities(data["perplexity"], where),
                      "workload_latency_ms": _latencies(data["workload_latency_ms"], where),
                      "blocks_removed": _blocks(data["blocks_removed"], where),
                      "latency": _pair(data.get("latency")), "parameters": _pair(data.get("parameters")),
                      "size_bytes": _pair(data.get("size_bytes")),
                      "backend": BackendInfo(**_known(BackendInfo, data.get("backend") or {})),
                      "attempts": [Attempt(**_known(Attempt, a)) for a in data.get("attempts") or []],
                      "tradeoff": [TradeoffPoint(**_known(TradeoffPoint, p)) for p in data.get("tradeoff") or []],
                      "baselines": [Baseline(**_known(Baseline, b)) for b in data.get("baselines") or []
                                    if isinstance(b, dict) and {"kind", "precision", "blocks_removed"} <= set(b)],
                      "sweep": _sweep(data.get("sweep")),
                      **{k: data.get(k) or {} for k in ("plan", "exports", "settings", "seconds", "artifacts", "choice")},
                      **{k: data.get(k) or [] for k in ("notes", "blocks_linearized", "timings_reused")}})

    @property
    def strategy(self) -> str | None:
        """The plan's strategy (older reports name it only in the plan summary or the settings)."""
        import re

        if self.plan.get("strategy"):
            return str(self.plan["strategy"])
        match = re.match(r"\s*plan \(([^)]+)\)", str(self.plan.get("summary", "")))
        if match:
            return match.group(1)
        return str(self.settings["strategy"]) if self.settings.get("strategy") else None


def _known(cls, data: dict) -> dict:
    """The keys of `data` that are fields of `cls` (newer or older extra keys are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names} if isinstance(data, dict) else {}


def _pair(data) -> Pair | None:
    if isinstance(data, dict) and "original" in data and "compressed" in data:
        return Pair(original=data["original"], compressed=data["compressed"])
    return None  # older reports wrote {} for a quantity they had no value for


def _perplexities(data, where: str) -> Perplexities:
    if not (isinstance(data, dict) and isinstance(data.get("original"), dict) and data["original"]
            and isinstance(data.get("compressed"), dict) and data["compressed"]):
        raise DataError(f"{where} has no original and compressed perplexities")
    return Perplexities(original=dict(data["original"]), compressed=dict(data["compressed"]),
                        pruned_before_heal=dict(data.get("pruned_before_heal") or {}),
                        healed_full_precision=dict(data.get("healed_full_precision") or {}))


def _latencies(data, where: str) -> Pair:
    pair = _pair(data)
    if pair is None or not all(is_number(v) for v in (pair.original, pair.compressed)):
        raise DataError(f"{where} has no original and compressed workload latencies")
    return pair


def _blocks(data, where: str) -> list[int]:
    if not isinstance(data, list):
        raise DataError(f"{where}: blocks_removed is not a list")
    return list(data)


def _sweep(data) -> list[SweepPoint] | None:
    """Sweep points (entries without blocks_removed are skipped; a missing latency reads as None)."""
    if data is None:
        return None
    points = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or "blocks_removed" not in entry:
            continue
        ppl = entry.get("perplexity")
        points.append(SweepPoint(**{**_known(SweepPoint, entry), "latency_ms": entry.get("latency_ms"),
                                    "perplexity": ppl if isinstance(ppl, dict) else {}}))
    return points


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    return is_number(value) and math.isfinite(value)
