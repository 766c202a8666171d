"""`compress report`: merging finished `compress model` run directories (synthetic report.json, no models)."""

from __future__ import annotations

import base64
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from compressor.errors import DataError
from compressor.report import default_labels, merge_reports, pareto_front, write_merged_reports

COMPRESS = Path(sys.executable).with_name("compress")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_report(model="tiny", strategy="auto", removed=(1, 2), lat=(100.0, 70.0), ppl=(10.0, 12.5),
               evals=("held-out",), backend="onnxruntime", sweep=None) -> dict:
    report = {
        "model": model, "target_speedup": 1.3, "max_ppl_increase": None,
        "speedup_measured": lat[0] / lat[1], "target_met": lat[0] / lat[1] >= 1.3,
        "blocks_original": 8, "blocks_removed": list(removed),
        "blocks_linearized": [{"start": removed[0], "end": removed[-1] + 1, "form": "full"}],
        "perplexity": {"original": {e: ppl[0] + i for i, e in enumerate(evals)},
                       "pruned_before_heal": {e: ppl[1] * 2 for e in evals},
                       "compressed": {e: ppl[1] + i for i, e in enumerate(evals)}},
        "workload_latency_ms": {"original": lat[0], "compressed": lat[1]},
        "latency": {"original": {}, "compressed": {}},
        "backend": {"name": backend, "device": "cpu", "threads": 2, "versions": {}},
        "parameters": {"original": 1000, "compressed": 800}, "size_bytes": {},
        "plan": {"strategy": strategy, "summary": f"plan ({strategy}): remove {len(removed)} of 8 blocks"},
        "settings": {"strategy": strategy, "backend": backend}, "tradeoff": [],
    }
    if sweep is not None:
        report["sweep"] = sweep
    return report


def make_run(path: Path, report: dict) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return path


def compress(*args):
    """`compress report ARGS` through the real entry point, in this process (see conftest.run_cli)."""
    return run_cli("report", *args)


def compress_script(*args):
    """The installed `compress` console script itself, in a subprocess."""
    return subprocess.run([str(COMPRESS), "report", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def brute_force_front(points):
    def dominates(a, b):
        return (a["latency_ms"] <= b["latency_ms"] and a["perplexity"] <= b["perplexity"]
                and (a["latency_ms"] < b["latency_ms"] or a["perplexity"] < b["perplexity"]))

    return [p for p in points if not any(dominates(q, p) for q in points)]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(0, 12)
        # a small grid makes ties in latency, perplexity or both common
        points = [{"latency_ms": float(rng.randint(1, 6)), "perplexity": float(rng.randint(1, 6)), "i": i}
                  for i in range(n)]
        front = pareto_front(points)
        assert sorted(p["i"] for p in front) == sorted(p["i"] for p in brute_force_front(points)), points
        assert [p["latency_ms"] for p in front] == sorted(p["latency_ms"] for p in front)


def test_pareto_front_ignores_non_finite_points():
    points = [{"latency_ms": 1.0, "perplexity": float("nan")}, {"latency_ms": 2.0, "perplexity": 3.0},
              {"latency_ms": None, "perplexity": 1.0}, {"latency_ms": 3.0, "perplexity": float("inf")}]
    assert pareto_front(points) == [{"latency_ms": 2.0, "perplexity": 3.0}]


def test_default_labels_are_unique():
    assert default_labels(["a/run", "b/run", "c"]) == ["a/run", "b/run", "c"]
    assert default_labels(["x/run", "x/run", "x/run"]) == ["x/run", "x/run-2", "x/run-3"]


def test_merge_rows_points_and_pareto():
    sweep = [{"blocks_removed": k, "latency_ms": lat, "perplexity": {"held-out": ppl}, "speedup": 101 / lat}
             for k, lat, ppl in ((1, 85.0, 11.0), (2, 75.0, 12.0), (3, 70.0, 19.0))]
    reports = [run_report(strategy="influence", removed=(3,), lat=(100.0, 90.0), ppl=(10.0, 10.5)),
               run_report(strategy="greedy", removed=(1, 2, 5), lat=(101.0, 65.0), ppl=(10.0, 14.0),
                          evals=("held-out", "code"), sweep=sweep)]
    merged = merge_reports(reports, ["a", "b"])
    assert merged["eval"] == "held-out" and merged["notes"] == []
    for row, report, label in zip(merged["runs"], reports, ["a", "b"]):
        assert row["label"] == label
        assert row["model"] == report["model"]
        assert row["strategy"] == report["plan"]["strategy"]
        assert (row["backend"], row["device"]) == ("onnxruntime", "cpu")
        assert row["blocks_removed"] == report["blocks_removed"]
        assert row["blocks_removed_count"] == len(report["blocks_removed"])
        assert row["speedup_measured"] == report["speedup_measured"]
        assert row["target_met"] == report["target_met"]
        assert row["perplexity"] == {k: report["perplexity"][k] for k in ("original", "compressed")}
        assert row["workload_latency_ms"] == report["workload_latency_ms"]
    assert len(merged["points"]) == 2 + 2 + len(sweep)
    assert {p["kind"] for p in merged["points"] if p["run"] == "b"} == {"original", "compressed", "sweep"}
    front = [(p["run"], p["kind"], p["blocks_removed"]) for p in merged["pareto"]]
    # b's sweep k=3 (70 ms, 19) is dominated by b's compressed run (65 ms, 14), b's original by a's
    assert front == [("b", "compressed", 3), ("b", "sweep", 2), ("b", "sweep", 1), ("a", "compressed", 1),
                     ("a", "original", 0)]
    assert merged["pareto"] == pareto_front(merged["points"])
    assert json.loads(json.dumps(merged)) == merged


def test_merge_without_shared_eval_uses_each_first_and_says_so():
    merged = merge_reports([run_report(evals=("wiki",)), run_report(evals=("code", "wiki2"), backend="torch")],
                           ["a", "b"])
    assert merged["eval"] is None
    assert [r["eval"] for r in merged["runs"]] == ["wiki", "code"]
    assert any("share no evaluation text" in n for n in merged["notes"])
    assert any("different backends" in n for n in merged["notes"])


def test_merge_refuses_bad_input():
    with pytest.raises(DataError):
        merge_reports([], [])
    with pytest.raises(DataError, match="missing"):
        merge_reports([{"model": "x"}], ["a"])


def test_written_reports_embed_a_png(tmp_path):
    merged = merge_reports([run_report(), run_report(strategy="angular", lat=(99.0, 80.0), ppl=(10.0, 11.0))],
                           ["a", "b"])
    paths = write_merged_reports(merged, tmp_path)
    assert json.loads(paths["json"].read_text()) == merged
    md = paths["md"].read_text()
    assert "| a | tiny | auto |" in md and "| b | tiny | angular |" in md and "Pareto front" in md
    html = paths["html"].read_text()
    encoded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(encoded) == 1
    assert base64.b64decode(encoded[0]).startswith(PNG_SIGNATURE)


def test_cli_merges_runs(tmp_path):
    a = make_run(tmp_path / "a", run_report())
    b = make_run(tmp_path / "b", run_report(strategy="linearity", lat=(100.0, 60.0), ppl=(10.0, 15.0)))
    out = tmp_path / "m"
    result = compress_script(a, b, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)
    assert [r["label"] for r in merged["runs"]] == ["a", "b"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == merged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = compress(a, b, "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def _bad_inputs(tmp_path):
    good = make_run(tmp_path / "good", run_report())
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text('{"model": ')
    other = make_run(tmp_path / "other", {"model": "x"})
    return {
        "no runs": ([], "no runs"),
        "missing dir": ([good, tmp_path / "nosuch"], "not a run directory"),
        "no report.json": ([good, empty], "not a run directory"),
        "bad json": ([good, broken], "cannot read"),
        "not a report": ([good, other], "not a compress model report"),
        "out replaces a run": ([good, tmp_path], "would replace"),
    }


CASES = ["no runs", "missing dir", "no report.json", "bad json", "not a report"]


@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input(tmp_path, case):
    runs, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "m"
    result = compress(*runs, "--out", out)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    runs = [make_run(tmp_path / "runs" / name, run_report()) for name in ("a", "b")]
    for out in (runs[0], tmp_path / "runs"):
        result = compress(*runs, "--out", out, "--overwrite")
        assert result.returncode == 2 and "would replace" in result.stderr, result.stderr
    assert all((r / "report.json").is_file() for r in runs)
    assert sorted(p.name for p in runs[0].iterdir()) == ["report.json"]



# --- the typed report ---------------------------------------------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_report_round_trips_and_carries_its_schema_version():
    from compressor.report import SCHEMA_VERSION, Report

    report = Report.from_dict(run_report(sweep=[{"blocks_removed": 1, "latency_ms": 80.0,
                                                 "perplexity": {"held-out": 11.0}, "speedup": 1.25}]))
    data = report.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION and next(iter(data)) == "schema_version"
    assert Report.from_dict(json.loads(json.dumps(data))) == report
    assert report.perplexity.compressed == {"held-out": 12.5} and report.sweep[0].latency_ms == 80.0
    assert report.size_bytes is None  # the unversioned schema wrote {} for "no value"
    assert report.strategy == "auto"


def test_sweep_points_sit_on_the_baselines_latency_axis():
    """A sweep point is placed at the final benchmark's original latency over its own measured speedup, as the
    baselines are, whatever latency its own timing round read: the unpruned int4 point lands on int4 alone."""
    from compressor.report import Report
    from compressor.report.figures import baseline_points, sweep_points

    data = run_report(lat=(100.0, 55.0), sweep=[
        {"precision": "int4", "blocks_removed": 0, "latency_ms": 47.0, "perplexity": {"held-out": 11.0}, "speedup": 1.8},
        {"precision": "int4", "blocks_removed": 6, "latency_ms": 40.0, "perplexity": {"held-out": 14.0}, "speedup": 2.2},
        {"precision": "fp32", "blocks_removed": 6, "latency_ms": 83.0, "perplexity": {"held-out": 13.0}}])
    data["baselines"] = [{"kind": "quantize-only", "precision": "int4", "blocks_removed": 0, "speedup": 1.8,
                          "latency_ms": 100.0 / 1.8, "perplexity": {"held-out": 11.0}}]
    report = Report.from_dict(data)
    points = sweep_points(report)
    assert [p["latency_ms"] for p in points] == [100.0 / 1.8, 100.0 / 2.2, 83.0]  # no speedup: its own reading
    assert points[0]["latency_ms"] == next(b["latency_ms"] for b in baseline_points(report))


def test_a_newer_schema_is_refused_with_what_to_do():
    from compressor.report import SCHEMA_VERSION, Report

    with pytest.raises(DataError, match="upgrade compressor"):
        Report.from_dict({**run_report(), "schema_version": SCHEMA_VERSION + 1})


@pytest.mark.parametrize("name", ["demo-1.3x.report.json", "model-wiki-1.25x.report.json"])
def test_old_unversioned_reports_still_merge(tmp_path, name):
    """report.json files written before the schema had a version (bench/results) are read as they are."""
    old = json.loads((RESULTS / name).read_text())
    assert "schema_version" not in old
    run = make_run(tmp_path / "old", old)
    result = compress(run, make_run(tmp_path / "new", run_report()), "--out", tmp_path / "m", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["runs"][0]
    assert row["blocks_removed"] == old["blocks_removed"] and row["speedup_measured"] == old["speedup_measured"]


def test_writing_a_report_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook's backend survives: the figures are drawn without pyplot (the library used to call
    matplotlib.use("Agg"))."""
    code = ("import json, sys, matplotlib\nmatplotlib.use('svg')\n"
            "from compressor.report import Report, write_reports\n"
            f"report = Report.from_dict(json.loads({json.dumps(json.dumps(run_report()))}))\n"
            "write_reports(report, sys.argv[1], {'blocks': [{'index': 0, 'linearity': 0.5, "
            "'linearity_without_residual': 0.2, 'block_influence': 0.1}]})\n"
            "print(matplotlib.get_backend())\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1  # the profile (the tradeoff is empty in run_report)
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] >= 1
