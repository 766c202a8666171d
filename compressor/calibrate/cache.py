"""Profiles on disk: writing and reading a profile directory, and a cache keyed by what decides
the result (model fingerprint, the exact tokens, and the settings that change the numbers).

A profile directory holds profile.json, profile.csv, profile.png and, when asked for,
stats.safetensors (the raw float64 statistics). The cache keeps such directories under
`compressor.util.io.cache_dir("profiles")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from compressor.calibrate.profile import DEFAULT_OUTLIER_FACTOR, Profile, calibrate
from compressor.calibrate.stats import Stats
from compressor.data import load_texts, make_windows
from compressor.errors import CompressorError, DataError
from compressor.util.fingerprint import model_fingerprint, windows_fingerprint
from compressor.util.io import atomic_dir, optional_cache_dir, write_json
from compressor.util.parallel import rank_world
from compressor.util.progress import status

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"


def write_profile(profile: Profile, out: Path | str, with_stats: bool = False, figure: bool = True) -> None:
    """Write profile.json, profile.csv, profile.png (and stats.safetensors) into the directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "profile.json", profile.to_dict())
    (out / "profile.csv").write_text(profile.to_csv())
    if figure:
        from compressor.calibrate.plot import plot_profile

        plot_profile(profile, out / "profile.png")
    if with_stats and profile.stats is not None:
        profile.stats.save(out / STATS_FILE)


def read_profile(path: Path | str) -> Profile:
    """A profile from a directory (or its profile.json); with its statistics when saved beside it."""
    path = Path(path)
    file = path / "profile.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read a profile from {file}: run `compress calibrate` to make one") from exc
    stats_file = file.parent / STATS_FILE
    return Profile.from_dict(data, Stats.load(stats_file) if stats_file.is_file() else None)


def profile_for(
    model,
    data: Path | str | list[str] | torch.Tensor | None = None,
    *,
    tokenizer=None,
    field: str = "text",
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    spans_max: int | None = None,
    intrinsic_dim: bool = False,
    exclude_outliers: float | None = DEFAULT_OUTLIER_FACTOR,
    pairs=(),
    with_stats: bool = False,
    cache: bool = True,
    dtype: str = "float32",
    device: str | None = "cpu",
    device_map=None,
    allow_pickle: bool = False,
) -> Profile:
    """The profile of `model` (a spec for `load_model`, or a loaded model) over `data`, from the cache
    when model, tokens and settings match a previous run.

    data: a path for `load_texts`, a list of texts, a LongTensor of windows, or None (bundled text).
    A spec is loaded only on a cache miss; a loaded model needs `tokenizer` unless data are windows.
    with_stats: also keep (and require from the cache) the raw float64 statistics.
    """
    from compressor.loading import load_model, resolve

    spec = model
    source = resolve(model) if isinstance(model, (str, Path)) else None
    windows = _windows(data, tokenizer, source, field, samples, seq_len, seed)
    fingerprints = {"model": model_fingerprint(source if source is not None else model),
                    "data": windows_fingerprint(windows)}
    settings = {"spans_max": spans_max, "intrinsic_dim": intrinsic_dim, "outlier_factor": exclude_outliers or None,
                "pairs": sorted([list(p) for p in pairs]), "seed": seed,
                "dtype": dtype if source is not None else str(next(model.parameters()).dtype)}
    key = hashlib.sha256(json.dumps([fingerprints, settings], sort_keys=True).encode()).hexdigest()[:24]
    folder = optional_cache_dir("profiles") if cache else None
    entry = folder / key if folder is not None else None
    cache = entry is not None
    if cache and (entry / "profile.json").is_file() and (not with_stats or (entry / STATS_FILE).is_file()):
        status(f"using the cached profile {entry}")
        profile = read_profile(entry)
        profile.model = str(spec) if source is not None else profile.model
        return profile
    if source is not None:
        status(f"loading {model}")
        model, _ = load_model(source, dtype=dtype, device=device, device_map=device_map,
                              allow_pickle=allow_pickle, with_tokenizer=False)
        name = str(spec)
    else:
        name = None
    profile = calibrate(model, windows, batch_size=batch_size, spans_max=spans_max, intrinsic_dim=intrinsic_dim,
                        exclude_outliers=exclude_outliers, pairs=pairs, seed=seed, name=name)
    profile.fingerprints = fingerprints
    profile.settings |= {"seed": seed, "dtype": settings["dtype"]}
    if cache and rank_world()[0] == 0:
        _store(profile, entry, with_stats)
    return profile


def _windows(data, tokenizer, source, field: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The calibration windows: `data` itself when it is token ids, else tokenized text."""
    from compressor.loading import load_tokenizer

    if isinstance(data, torch.Tensor):
        return data
    if tokenizer is None:
        if source is None:
            raise DataError("profile_for needs the tokenizer of a loaded model (or windows of token ids)")
        tokenizer = load_tokenizer(source)
    texts = data if isinstance(data, list) else load_texts(data, field)
    return make_windows(tokenizer, texts, samples, seq_len, seed)


def _store(profile: Profile, entry: Path, with_stats: bool) -> None:
    try:
        with atomic_dir(entry, overwrite=True) as tmp:
            write_profile(profile, tmp, with_stats=with_stats, figure=False)
    except (OSError, CompressorError) as exc:  # a cache that cannot be written is not worth failing the run for
        log.warning("could not cache the profile in %s: %s", entry, exc)
