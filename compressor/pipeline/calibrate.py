"""The calibration stage: the linearity profile of every block on the calibration windows (cached)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.calibrate import Profile, profile_for
from compressor.pipeline.runner import inputs_of
from compressor.util.progress import status


@dataclass(frozen=True)
class ProfileInputs:
    """What the calibration windows (and so the profile) depend on."""

    data: Path | None
    field: str
    samples: int
    seq_len: int
    seed: int


def profile_inputs(cfg) -> ProfileInputs:
    return inputs_of(ProfileInputs, cfg)


def calibrate_stage(run, windows) -> Profile:
    def compute():
        status("calibrating")
        # a run without `out` writes nothing, so it neither reads nor fills the profile cache
        return profile_for(run.model, windows, seed=run.cfg.seed, cache=run.runner.persistent).to_dict()

    return Profile.from_dict(run.runner.cached("profile", profile_inputs(run.cfg), compute))
