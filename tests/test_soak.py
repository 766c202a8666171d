"""bench/soak.py, short: a few SIGKILLs and SIGINTs at random moments lose no work (the full soak, 20 + 10
interruptions, is `python bench/soak.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.mark.slow
def test_interruptions_at_random_moments_lose_nothing():
    done = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--ints", "2", "--seed", "1"],
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 of 5 interruptions survived" in done.stdout
