"""Atomic writes deliver files and folders with the modes the umask asks for, like any other tool."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from compressor.util.io import atomic_dir, atomic_file, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask_not_mkdtemp(tmp_path, umask_022):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    write_json(tmp_path / "report.json", {"a": 1})
    with atomic_file(tmp_path / "report.html") as tmp:
        tmp.write_text("<html/>")
    with atomic_file(tmp_path / "maps.safetensors") as tmp:  # safetensors writes a new file in the path's place
        save_file({"m": torch.zeros(2)}, tmp)
    plain_dir, plain_file = tmp_path / "plain", tmp_path / "plain.txt"  # what os.mkdir / open make under 022
    plain_dir.mkdir()
    plain_file.write_text("")
    assert mode(tmp_path / "model") == mode(plain_dir) == 0o755
    assert mode(tmp_path / "report.json") == mode(tmp_path / "report.html") == mode(plain_file) == 0o644
    assert mode(tmp_path / "maps.safetensors") == 0o644


def test_a_stricter_umask_is_honoured(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "model"):
            pass
        write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert mode(tmp_path / "model") == 0o700 and mode(tmp_path / "r.json") == 0o600
