"""`compress heal` end to end on a tiny checkpoint, and its bad inputs as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from conftest import make_tokenizer, run_cli, tiny_model
from heal_fixtures import one_thread, pair  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compressor.cli.heal import heal
from compressor.heal import HealConfig
from compressor.surgery.edit import save_checkpoint

FAST = ["--steps", "3", "--seq-len", "16", "--samples", "8", "--eval-samples", "2", "--batch-size", "2"]


def compress(*args, cwd):
    """`compress ARGS` through the real entry point, in this process, from the folder `cwd`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return run_cli(*args)


@pytest.fixture
def checkpoints(tmp_path):
    teacher, student = pair(drop=(1,))
    save_checkpoint(teacher, make_tokenizer(), tmp_path / "teacher")
    save_checkpoint(student, make_tokenizer(), tmp_path / "student")
    save_checkpoint(tiny_model("llama", hidden_size=64), make_tokenizer(), tmp_path / "wide")
    return tmp_path


def test_heal_writes_a_standard_checkpoint(checkpoints, monkeypatch):
    app = typer.Typer()
    app.command()(heal)
    monkeypatch.chdir(checkpoints)
    run = CliRunner().invoke(app, ["student", "--teacher", "teacher", "--out", "healed", "--json",
                                   "--teacher-cache", "cache", *FAST])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["steps"] == 3 and report["ppl_after"] is not None and report["teacher_cache"]
    healed = AutoModelForCausalLM.from_pretrained(checkpoints / "healed")
    assert healed.config.compressor["removed"] == [1] and len(healed.model.layers) == 3
    assert not list(Path(checkpoints).glob(".healed*"))  # no training state or temporary dir left
    # --no-autocast reaches the training loop (the default is bf16 wherever the CPU computes it natively)
    run = CliRunner().invoke(app, ["student", "--teacher", "teacher", "--out", "fp32", "--json", "--no-autocast",
                                   "--teacher-cache", "off", *FAST])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["precision"] == "float32"


@pytest.mark.parametrize("args, message", [
    (["--teacher", "wide"], "teacher does not match the student (width 64"),
    (["--teacher", "teacher", "--data", "missing.txt"], "missing.txt does not exist"),
    (["--teacher", "teacher", "--hidden-at", "middle"], "--hidden-at must be one of cuts, every"),
])
def test_bad_inputs_exit_2_with_one_line(checkpoints, args, message):
    run = compress("heal", "student", "--out", "healed", *args, *FAST, cwd=checkpoints)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not (checkpoints / "healed").exists()


def test_every_bad_setting_is_reported_at_once_and_lr_follows_the_mode():
    problems = HealConfig(steps=0, alpha=3, train="some", distributed="mpi", hidden_at="middle").problems()
    assert len(problems) == 5 and any("--alpha weighs KD" in p for p in problems)
    assert any("--hidden-at must be one of cuts, every" in p for p in problems)
    assert HealConfig(train="touched").lr == 1e-3 and HealConfig(train="all").lr == 2e-4
    assert HealConfig(train="all", lr=5e-5).lr == 5e-5
