"""`compress plan`, `prune --plan`, `linearize` and `compare` on a tiny model: results and refusals."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import make_tokenizer, run_cli, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from compressor.cli.compare import compare
from compressor.cli.linearize import linearize
from compressor.cli.plan import plan
from compressor.cli.prune import prune
from compressor.errors import InvalidPlanError
from compressor.select import STRATEGIES
from compressor.surgery.plan import Plan, write_plan

FAST = ["--samples", "8", "--seq-len", "16"]


def compress_process(*args, cache):
    """The real entry point (`compressor.cli.main`): exit codes and the one-line error."""
    return run_cli(*args, env={"COMPRESSOR_CACHE": cache})


@pytest.fixture
def six_dir(tmp_path):
    path = tmp_path / "tiny-six"
    tiny_model("llama", num_hidden_layers=6).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def compress(*args, cache):
    """In process (fast), for runs that succeed."""
    app = typer.Typer()
    app.callback()(lambda: None)
    for command in (plan, prune, linearize, compare):
        app.command(name=command.__name__)(command)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSOR_CACHE", str(cache))
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_plan_then_prune_applies_without_calibration_data(six_dir, tmp_path):
    plan_file = tmp_path / "plans" / "plan.json"
    made = compress("plan", six_dir, "--drop", "2", "--strategy", "angular", "--out", plan_file, *FAST, "--json",
                    cache=tmp_path / "cache")
    assert made.exit_code == 0, made.output
    data = json.loads(made.stdout)
    assert data["drop"] == json.loads(plan_file.read_text())["drop"] and len(data["drop"]) == 2
    if data["linearize"]:
        assert (plan_file.parent / data["maps"]).is_file()
    out = tmp_path / "pruned"
    pruned = compress("prune", six_dir, "--plan", plan_file, "--out", out, cache=tmp_path / "cache")
    assert pruned.exit_code == 0, pruned.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert model.config.compressor["removed"] == data["drop"]
    assert model.config.compressor["linearized"] == [{"start": s["start"], "end": s["end"]} for s in data["linearize"]]


def test_linearize_folds_into_a_standard_checkpoint(six_dir, tmp_path):
    out = tmp_path / "lin"
    done = compress("linearize", six_dir, "--blocks", "2-3", "--form", "projection", "--out", out, *FAST,
                    cache=tmp_path / "cache")
    assert done.exit_code == 0, done.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    assert model.config.compressor["linearized"] == [{"start": 2, "end": 4}]


def test_compare_prints_one_json_document(six_dir, tmp_path):
    result = compress("compare", six_dir, "--drop", "1", "--strategies", "influence,angular", "--eval-tokens",
                      "200", "--max-length", "32", "--stride", "16", *FAST, "--json", cache=tmp_path / "cache")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 2 * 2 and data["unpruned"] > 1
    assert {r["label"] for r in data["rows"]} == {"influence", "influence + linear", "angular", "angular + linear"}


@pytest.mark.parametrize("args, message", [
    (["plan", "--drop", "6"], "from 1 to 5"),
    (["prune", "--plan", "PLAN"], "6 blocks, this one has 4"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(six_dir, tiny_dir, tmp_path, args, message):
    out = tmp_path / "result"
    model = six_dir
    if "PLAN" in args:  # a plan made for the 6-block model, applied to the 4-block one
        args = [a if a != "PLAN" else write_plan(Plan("angular", 6, [2, 3]), tmp_path / "p.json") for a in args]
        model = tiny_dir
    extra = FAST if args[0] != "prune" else []
    result = compress_process(args[0], model, *args[1:], "--out", out, *extra, cache=tmp_path / "cache")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.glob("result*")) and not list(tmp_path.glob(".result*"))


@pytest.mark.parametrize("args, message", [
    (["plan", "--drop", "2", "--strategy", "best"], "unknown strategy 'best': choose one of"),
    (["linearize", "--blocks", "0-1"], "start at block 0"),
])
def test_refusals_name_the_problem_and_write_nothing(six_dir, tmp_path, args, message):
    """In process (the exit code and one-line rendering are checked above): the error and its text."""
    app = typer.Typer()
    app.callback()(lambda: None)
    for command in (plan, linearize):
        app.command(name=command.__name__)(command)
    result = CliRunner().invoke(app, [args[0], str(six_dir), *args[1:], "--out", str(tmp_path / "result"), *FAST])
    assert isinstance(result.exception, InvalidPlanError) and message in str(result.exception)
    assert "\n" not in str(result.exception)
    assert not list(tmp_path.glob("result*")) and not list(tmp_path.glob(".result*"))
    if "best" in args:
        assert all(name in str(result.exception) for name in STRATEGIES)
