"""Calibration: a streaming per-block profile of linearity, influence and geometry.

    from compressor.calibrate import calibrate
        profile = calibrate(model, make_windows(tokenizer, load_texts(None), 64, 256, seed=0))
    profile.blocks[12].linearity, profile.stats.block(12)   # metrics, raw float64 statistics

`profile_for(spec_or_model, data, ...)` does the same with a cache keyed by model, data and settings.
"""

from compressor.calibrate.cache import profile_for, read_profile, write_profile
from compressor.calibrate.profile import BlockMetrics, Profile, SpanMetrics, calibrate
from compressor.calibrate.stats import PairStats, Stats

__all__ = ["BlockMetrics", "PairStats", "Profile", "SpanMetrics", "Stats", "calibrate", "profile_for",
           "read_profile", "write_profile"]
