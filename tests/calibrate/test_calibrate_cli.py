"""`compress calibrate`: outputs, cache, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compressor import cli
from compressor.cli.calibrate import calibrate as calibrate_command

# Registers the command when the lead has not mounted it yet (then runs the real `main`).
RUN = ("import sys, compressor.cli as c; from compressor.cli.calibrate import calibrate; "
       "any(n == 'calibrate' for _, _, n in c.COMMANDS) or c.app.command(name='calibrate')(calibrate); "
       "sys.argv[0] = 'compress'; c.main()")


def main(capsys, *args) -> tuple[int, str, str]:
    """Run `compress calibrate ...` in this process through cli.main (error handling included)."""
    if not any(name == "calibrate" for _, _, name in cli.COMMANDS) and not any(
            c.name == "calibrate" for c in cli.app.registered_commands):
        cli.app.command(name="calibrate")(calibrate_command)
    argv, sys.argv = sys.argv, ["compress", "calibrate", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


def test_writes_profile_and_reuses_the_cache(tiny_dir, tmp_path, capsys):
    args = [tiny_dir, "--samples", 4, "--seq-len", 16, "--batch-size", 2, "--spans-max", 2]
    code, out, err = main(capsys, *args, "--out", tmp_path / "p1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["tokens"] == 64 and len(doc["blocks"]) == 4
    assert set(doc["blocks"][0]) >= {"index", "linearity", "linearity_without_residual", "block_influence",
                                     "relative_contribution", "anisotropy", "linearity_no_outliers"}
    assert {"start": 0, "length": 2} == {k: doc["spans"][4][k] for k in ("start", "length")}
    assert set(doc["fingerprints"]) == {"model", "data"}
    for name in ("profile.json", "profile.csv", "profile.png"):
        assert (tmp_path / "p1" / name).stat().st_size > 0
    assert (tmp_path / "p1" / "profile.csv").read_text().count("\n") == 5

    code, out, err = main(capsys, *args, "--out", tmp_path / "p2")
    assert code == 0 and "using the cached profile" in err
    assert "linearity" in out  # the table
    assert json.loads((tmp_path / "p2" / "profile.json").read_text())["blocks"] == doc["blocks"]


@pytest.mark.parametrize("case", ["empty", "short", "binary", "samples0", "jsonl-field"])
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, case):
    data = tmp_path / "data.txt"
    extra = []
    if case == "empty":
        data.write_text("")
    elif case == "short":
        data.write_text("the of and to")
    elif case == "binary":
        data.write_bytes(bytes(range(256)) * 4)
    elif case == "samples0":
        data.write_text("the of and to " * 100)
        extra = ["--samples", "0"]
    else:
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps({"content": "the of and"}) + "\n")
    out_dir = tmp_path / "out"
    code, out, err = main(capsys, tiny_dir, "--data", data, "--seq-len", 16, *extra, "--out", out_dir)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err
    assert not out_dir.exists()
    assert not list(tmp_path.glob(".out*"))


def test_bad_input_in_a_real_process(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    env = {**os.environ, "COMPRESSOR_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", RUN, "calibrate", str(tiny_dir), "--data",
                          str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "empty" in run.stderr
    assert run.stdout == "" and not (tmp_path / "out").exists()
