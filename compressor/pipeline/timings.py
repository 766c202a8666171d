"""The timing cache: the measured speedups of a run's probes, kept across runs on this host.

On a shared CPU the speed ratio of two graphs drifts from one minute to the next (SmolLM2 at int4 alone
measured 1.26x to 1.66x against fp32 in seven runs of one day), so two runs that measure afresh can
remove a different number of blocks on top of a precision, or pick another precision. Like TensorRT's
timing cache, a probe measured once is reused by later runs that ask the same question on the same
host: they decide the same way, and skip the export and timing of every probe they reuse.

A probe's key holds everything its speedup depends on: the original model's content fingerprint, what
the probe is (precision, blocks removed, quantization and its calibration text), the backend, device,
threads, workload, timing settings and target (a timing near the target is repeated), the versions of
the runtime, PyTorch and compressor, and the host (CPU model, core count). `--fresh-timings` measures
every probe again and replaces its entry. The final benchmark, which gives the verdict, is never taken
from the cache, and the report lists what was reused, and when it was measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from compressor.util.io import optional_cache_dir, write_json
from compressor.util.progress import status

log = logging.getLogger(__name__)

PACKAGES = ("compressor", "torch", "onnxruntime", "onnxruntime-genai", "tensorrt")


def host() -> dict:
    """What a timing depends on in the machine: its architecture, CPU model and core count."""
    from compressor.evaluate.backends import cpu_name

    return {"machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count()}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def probe_entry_key(run, probe: dict, target: float | None) -> str:
    """The cache key of `probe` (what it is: a JSON-able dict) timed against the run's original model."""
    from compressor.pipeline.depth import timing_inputs
    from compressor.pipeline.measure import SLOWDOWN
    from compressor.pipeline.runner import json_default

    data = {"model": run.content_id(), "probe": probe, "timing": asdict(timing_inputs(run.cfg)), "target": target,
            "host": host(), "versions": versions(), "slowdown": dict(sorted(SLOWDOWN.items()))}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=json_default).encode()).hexdigest()[:24]


def cached_timing(run, probe: dict, target: float | None, measure) -> dict:
    """`measure()`'s result (a JSON-able dict of measured speedups), from the timing cache when this probe
    was measured on this host before (and the run may use it: it writes its results and was not asked for
    fresh timings); a new measurement is stored. Reuses are listed in `run.reused_timings`."""
    path = cache_entry(run, "timings", probe_entry_key(run, probe, target) + ".json")
    if path is not None and not run.cfg.fresh_timings and path.is_file():
        try:
            stored = json.loads(path.read_text())
            result, when = stored["result"], stored["measured_at"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the unreadable timing cache entry %s: %s", path, exc)
        else:
            status(f"timing cache: {describe(probe)} measured at {when}")
            run.reused_timings.append({"probe": describe(probe), "measured_at": when})
            return result
    result = measure()
    if path is not None:
        try:
            write_json(path, {"probe": probe, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result})
        except OSError as exc:  # a cache that cannot be written is not worth failing the run for
            log.warning("could not write the timing cache entry %s: %s", path, exc)
    return result


def cache_entry(run, folder: str, name: str) -> Path | None:
    """compressor's cache folder/name for this run, or None: a run without `out` keeps no cache, and one
    that cannot be made (a read-only home, say) is not worth failing the run for."""
    folder = optional_cache_dir(folder) if run.runner.persistent else None
    return folder / name if folder is not None else None


def describe(probe: dict) -> str:
    what = probe.get("what", "probe")
    if what == "quantize-only":
        return f"{', '.join(probe['precisions'])} alone" + (" and one block left" if probe.get("one_left") else "")
    blocks = probe.get("blocks", 0)
    return f"{probe['precision']} alone" if not blocks else f"{probe['precision']}, {blocks} blocks removed"


def reuse_note(reused: list[dict]) -> str | None:
    """The report's note on the speedups taken from the timing cache, or None."""
    if not reused:
        return None
    times = sorted(r["measured_at"] for r in reused)
    span = times[0] if times[0] == times[-1] else f"{times[0]} to {times[-1]}"
    return (f"{len(reused)} probe timings came from the timing cache (measured on this host {span}): "
            f"{'; '.join(r['probe'] for r in reused)}. The final benchmark was measured afresh; "
            "--fresh-timings measures every probe again")
