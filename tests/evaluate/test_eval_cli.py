"""`compress bench`: the bench.json schema on a tiny model, and errors as one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json

import pytest
import typer
from conftest import run_cli
from typer.testing import CliRunner

from compressor.cli.bench import bench
from compressor.errors import DataError

FAST = ["--prefill", "1x8,2x8", "--decode", "4+3", "--warmup", "0", "--min-runs", "2", "--min-seconds", "0",
        "--max-length", "16", "--stride", "8", "--max-eval-tokens", "40", "--threads", "1"]


def run_bench(args):
    app = typer.Typer()
    app.command()(bench)
    return CliRunner().invoke(app, args, catch_exceptions=False)


def check_entries(doc):
    assert doc["backend"] == "torch" and doc["device"] == "cpu"
    assert {"torch", "transformers", "python"} <= set(doc["versions"])
    assert doc["settings"]["threads"] == 1
    assert doc["size_bytes"] > 0 and doc["memory"]["peak_rss_bytes"] > 0
    assert {"perplexity", "max_length", "stride", "tokens"} <= set(doc["perplexity"])
    assert (doc["perplexity"]["max_length"], doc["perplexity"]["stride"], doc["perplexity"]["tokens"]) == (16, 8, 39)
    assert [(e["batch"], e["seq"]) for e in doc["prefill"]] == [(1, 8), (2, 8)]
    assert [(e["batch"], e["prompt"], e["new_tokens"]) for e in doc["decode"]] == [(1, 4, 3)]
    for entry in doc["prefill"] + doc["decode"]:
        assert {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "std_ms", "tokens_per_s", "runs"} <= set(entry)


def test_bench_json_schema(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench([str(tiny_dir), *FAST, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads(out.read_text()) == printed
    check_entries(printed)


def test_bench_writes_nothing_without_out_and_runs_twice_in_one_folder(tiny_dir, tmp_path, monkeypatch):
    """It used to write ./bench.json by default and refuse the second run (the file existed)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for _ in range(2):
        result = run_bench([str(tiny_dir), *FAST, "--no-perplexity", "--json"])
        assert result.exit_code == 0, result.output
        assert [(e["batch"], e["seq"]) for e in json.loads(result.stdout)["prefill"]] == [(1, 8), (2, 8)]
    assert list(work.iterdir()) == []


def test_bench_compare_reports_speedups(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench([str(tiny_dir), "--compare", str(tiny_dir), *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "speedup" in result.stdout
    doc = json.loads(out.read_text())
    check_entries(doc)
    check_entries(doc["compare"]["other"])
    speedup = doc["compare"]["speedup"]
    assert "A time / B time" in speedup["means"]
    assert [(e["batch"], e["seq"]) for e in speedup["prefill"]] == [(1, 8), (2, 8)]
    assert all(e["p50"] > 0 and e["mean"] > 0 for e in speedup["prefill"] + speedup["decode"])
    assert speedup["perplexity_ratio"] == 1.0  # the same model on the same text


def compress(*args):
    return run_cli("bench", *args)


def test_errors_are_one_line_with_exit_code_2(tiny_dir, tmp_path):
    out = str(tmp_path / "b.json")
    unknown = compress(str(tiny_dir), "--backend", "tflite", "--out", out)
    assert unknown.returncode == 2 and "torch" in unknown.stderr and "onnxruntime" in unknown.stderr
    missing = compress(str(tiny_dir), "--backend", "tensorrt", "--out", out)
    assert missing.returncode == 2
    if importlib.util.find_spec("tensorrt") is None:  # the library message is checked exactly elsewhere
        assert "tensorrt" in missing.stderr and "pip install" in missing.stderr
    for run in (unknown, missing):
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "b.json").exists()


def test_eval_text_without_tokens(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt"):
        run_bench([str(tiny_dir), "--eval", str(tmp_path / "empty.txt"), "--prefill", "none", "--decode", "none",
                   "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()
