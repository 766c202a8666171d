"""`compress model` on the real SmolLM2-135M within a perplexity budget: a working model and all three reports."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.smollm2


def test_smollm2_compresses_within_a_budget_and_reports(tmp_path, smollm2_pair):
    """smollm2_pair: the packaged model is converted into the cache once (or the test skips, saying why).

    A perplexity budget, so no timing decides the plan; the target-speedup path is tested end to end on a
    tiny model (test_pipeline.py). The
    default strategy and the export route are covered on SmolLM2 by test_select_smollm2 and
    test_export_smollm2."""
    out = tmp_path / "run"
    result = run_cli(
        "model", "smollm2-135m", "--max-ppl-increase", "25%", "--out", str(out),
        "--backend", "torch", "--threads", "1", "--workload", "1x16+2", "--samples", "8", "--seq-len", "128",
        "--strategy", "angular", "--format", "none",
        "--heal-steps", "1", "--min-seconds", "0.2", "--eval-tokens", "256", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["target_met"] and report["max_ppl_increase"] == pytest.approx(0.25)
    assert report["blocks_original"] == 30 and 1 <= len(report["blocks_removed"]) <= 15
    for name in ("report.json", "report.md", "report.html", "model/config.json", "plan.json"):
        assert (out / name).is_file(), name
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    (name, original), (other, other_original) = report["perplexity"]["original"].items()
    compressed = report["perplexity"]["compressed"][name]
    assert 5 < original < compressed <= 1.25 * original  # within the budget, and a working model
    # scored on text of another source too (Python's documentation), and a working model there as well
    assert "calibration source" in name and other == "Python documentation (other source)"
    assert 5 < other_original < report["perplexity"]["compressed"][other] < 10 * other_original
    assert "perplexity" in (out / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 30 - len(report["blocks_removed"])
    # the run directory's report reads back as the typed Report, in this schema
    from compressor.report import SCHEMA_VERSION, read_run_report

    typed = read_run_report(out)
    assert report["schema_version"] == SCHEMA_VERSION and typed.to_dict() == json.loads((out / "report.json").read_text())
