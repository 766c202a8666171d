"""Bad input is refused before any work (issue 22): one line on stderr, exit code 2, no model loaded and
nothing written; and the one reading of percentages and fractions (`parse_fraction`)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_cli

from compressor.cli.common import parse_fraction, parse_fractions
from compressor.errors import CompressorError


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: every refusal here must come before it."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("compressor.loading.load_model", loaded)
    monkeypatch.setattr("compressor.loading.resolve", loaded)


BUDGET = ["--max-ppl-increase", "10%"]
REFUSED = [
    (["--device", "foo", *BUDGET], "unknown device 'foo'"),
    (["--max-ppl-increase", "1.2.3"], "cannot read --max-ppl-increase '1.2.3'"),
    (["--max-ppl-increase", "10"], "--max-ppl-increase 10 is ambiguous: write 10% or 0.1"),
    (["--search-windows", "-1", *BUDGET], "--search-windows must be 0"),
    (["--threads", "-1", *BUDGET], "--threads must be 1 or more"),
    (["--threads", "0", *BUDGET], "--threads must be 1 or more"),
    (["--strategy", "nosuch", *BUDGET], "unknown strategy 'nosuch': choose one of"),
    (["--workload", "1x0+8", *BUDGET], "--workload needs a batch, prefill and new tokens of 1 or more"),
    (["--workload", "0x16+8", *BUDGET], "--workload needs a batch, prefill and new tokens of 1 or more"),
    (["--workload", "1x16+0", *BUDGET], "--workload needs a batch, prefill and new tokens of 1 or more"),
    (["--eval-tokens", "1", *BUDGET], "--eval-tokens must be 2 or more"),
    (["--sweep", "0,10,20", *BUDGET], "--sweep 10 is ambiguous: write 10% or 0.1"),
    (["--sweep", "0,x", *BUDGET], "cannot read --sweep 'x'"),
    (["--heal-quantization-aware", "--heal-train", "lora", *BUDGET], "use --heal-train touched or all, not lora"),
    (["--heal-quantization-aware", "--precision", "fp32", *BUDGET], "--heal-quantization-aware needs an int8 or int4"),
    (["--heal-local", "1", *BUDGET], "--heal-local must be in [0, 1)"),
    (["--heal-local", "0.5", "--heal-train", "all", *BUDGET], "--heal-local trains the blocks next to the cuts alone"),
]
if not torch.cuda.is_available():
    REFUSED.append((["--device", "cuda", *BUDGET], "--device cuda needs a cuda gpu"))


@pytest.mark.parametrize(("args", "fragment"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_model_options_are_one_line_and_exit_2_before_loading(tiny_dir, tmp_path, no_loading, args, fragment):
    out = tmp_path / "run"
    result = run_cli("model", tiny_dir, "--out", out, *args)
    assert result.returncode == 2, result.stderr
    assert fragment.lower() in result.stderr.lower(), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not (tmp_path / ".run.work").exists()


def test_every_problem_is_named_at_once(tiny_dir, tmp_path, no_loading):
    result = run_cli("model", tiny_dir, "--out", tmp_path / "run", *BUDGET, "--strategy", "nosuch",
                     "--threads", "0", "--eval-tokens", "1")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in ("unknown strategy", "--threads", "--eval-tokens"):
        assert fragment in result.stderr


def test_unknown_strategy_lists_the_registered_ones(tiny_dir, tmp_path, no_loading):
    from compressor.select import STRATEGIES

    result = run_cli("model", tiny_dir, "--out", tmp_path / "run", *BUDGET, "--strategy", "nosuch")
    assert all(name in result.stderr for name in STRATEGIES), result.stderr


def test_export_refuses_an_ambiguous_budget_before_loading(tiny_dir, tmp_path, no_loading):
    out = tmp_path / "onnx"
    for value, fragment in (("2", "--max-ppl-increase 2 is ambiguous: write 2% or 0.02"),
                            ("1.2.3", "cannot read --max-ppl-increase '1.2.3'")):
        result = run_cli("export", tiny_dir, "--out", out, "--precision", "int8", "--max-ppl-increase", value)
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()


def test_export_budget_is_a_percentage_or_a_fraction():
    from compressor.export.run import quant_options

    for text in ("2%", "0.02"):  # what `compress export` hands quant_options (which takes percent)
        _, bounds = quant_options("int8", max_ppl_increase_pct=100 * parse_fraction(text, "--max-ppl-increase"))
        assert bounds.max_ppl_increase == pytest.approx(0.02)


@pytest.mark.parametrize(("text", "value"), [("10%", 0.1), ("0.1", 0.1), (" 25 % ", 0.25), ("0", 0.0),
                                             ("150%", 1.5), (".5", 0.5), ("2.5%", 0.025)])
def test_parse_fraction_reads_percentages_and_fractions(text, value):
    assert parse_fraction(text, "--x") == pytest.approx(value)


@pytest.mark.parametrize(("text", "message"), [
    ("10", "--x 10 is ambiguous: write 10% or 0.1"),
    ("1", "--x 1 is ambiguous: write 1% or 0.01"),
    ("1.2.3", "cannot read --x '1.2.3'"),
    ("-5%", "cannot read --x '-5%'"),
    ("", "cannot read --x ''"),
    ("ten", "cannot read --x 'ten'"),
    ("nan", "cannot read --x 'nan'"),
])
def test_parse_fraction_refuses_ambiguous_and_unreadable_text(text, message):
    with pytest.raises(CompressorError, match=re.escape(message)) as caught:
        parse_fraction(text, "--x")
    assert "\n" not in str(caught.value)


def test_parse_fractions_reads_a_comma_list():
    assert parse_fractions("0,10%,0.2, 30%", "--sweep") == pytest.approx((0, 0.1, 0.2, 0.3))
