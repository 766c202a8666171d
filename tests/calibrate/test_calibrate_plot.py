"""The profile figure: a PNG is written, and the caller's matplotlib backend is left alone (the
library used to force Agg, which broke plotting in a user's notebook)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from compressor.calibrate import calibrate
from compressor.calibrate.plot import plot_profile, profile_figure

matplotlib = pytest.importorskip("matplotlib")


def test_plot_profile_writes_a_png_and_keeps_the_backend(tmp_path):
    model = tiny_model("llama")
    profile = calibrate(model, torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0)))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend a user might have chosen; the library must not replace it
    try:
        plot_profile(profile, tmp_path / "profile.png")
        figure = profile_figure(profile)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.get_ylabel() for a in figure.axes] == ["linearity score", "per token, mean"]
    assert list(tmp_path.iterdir()) == [tmp_path / "profile.png"]  # no temporary file left
