"""End to end: `compress model` on a tiny random model, every stage and artefact, and resumption."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

FAST = ["--workload", "1x32+8", "--samples", "8", "--seq-len", "32", "--heal-steps", "3",
        "--backend", "torch", "--threads", "1", "--min-seconds", "0.2"]


def compress(*args, **kw):
    return subprocess.run([sys.executable, "-m", "compressor", "model", *map(str, args)], capture_output=True, check=False,
                          text=True, timeout=600, **kw)


def test_end_to_end_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = compress(tiny_dir, "--target-speedup", "1.05", "--out", out, *FAST, "--sweep", "0,50",
                      "--heal-train", "all", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("target_speedup", "speedup_measured", "target_met", "blocks_original", "blocks_removed",
                "blocks_linearized", "perplexity", "latency", "artifacts"):
        assert key in report
    assert report["target_met"] is True and report["speedup_measured"] >= 1.05
    assert set(report["perplexity"]) >= {"original", "compressed"}
    for name in ("report.json", "report.md", "report.html", "profile.json", "model/config.json",
                 "onnx/model.onnx"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["blocks_removed"] == report["blocks_removed"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 4 - len(report["blocks_removed"])
    # --heal-train all reached healing: every parameter of the compressed model was trained
    assert report["heal"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the sweep: the unpruned point and half the blocks removed, each measured against the original
    sweep = {p["blocks_removed"]: p for p in report["sweep"]}
    assert sorted(sweep) == [0, 2] and sweep[0]["drop"] == [] and len(sweep[2]["drop"]) == 2
    assert all(p["latency_ms"] > 0 and p["perplexity"] for p in report["sweep"])
    assert "| 2 |" in (out / "report.md").read_text().split("Sweep")[1]
    # the plan that was applied is in the run directory, and applies to the original again
    from compressor.plan import read_plan

    assert read_plan(out / "plan.json").drop == report["blocks_removed"]


def test_perplexity_budget_picks_the_deepest_plan_within_it(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = compress(tiny_dir, "--max-ppl-increase", "2%", "--out", out, *FAST, "--heal-steps", "0",
                      "--format", "none", "--json")
    report = json.loads(result.stdout) if result.returncode != 2 else None
    if report is None:  # not even one block fits: the refusal says so, and nothing is left behind
        assert "exceeds the perplexity budget" in result.stderr and not out.exists()
        return
    assert result.returncode == (0 if report["target_met"] else 1), result.stderr
    pruned, original = report["perplexity"]["pruned_before_heal"], report["perplexity"]["original"]
    assert all(pruned[name] <= original[name] * 1.02 for name in original)
    assert report["blocks_removed"] and report["exports"] == {}


def test_interrupted_run_resumes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    work = tmp_path / ".run.work"
    args = [tiny_dir, "--target-speedup", "1.05", "--out", out, *FAST]
    process = subprocess.Popen([sys.executable, "-m", "compressor", "model", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work / "profile.stage.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    if out.exists():
        pytest.skip("the run finished before it could be interrupted")
    assert (work / "profile.stage.json").exists()
    result = compress(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming: profile" in result.stderr
    assert (out / "report.json").is_file() and not work.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--target-speedup", "50"], "ask for less"),
    (["--target-speedup", "0.9"], "must be above 1"),
    (["--target-speedup", "1.2", "--backend", "nosuch"], "unknown backend"),
    (["--target-speedup", "1.2", "--format", "tensorrt"], "tensorrt"),
    (["--target-speedup", "1.2", "--max-ppl-increase", "10%"], "exactly one"),
    (["--target-speedup", "1.2", "--heal-train", "everything"], "--heal-train must be one of"),
])
def test_bad_input(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "run"
    result = compress(tiny_dir, "--out", out, *FAST, *args)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / ".run.work").exists()


@pytest.mark.parametrize("fixed", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("first", [1, 5, 11, 20])
@pytest.mark.parametrize("target", [1.1, 1.3, 1.6])
def test_depth_search_finds_the_fewest_blocks_from_any_first_guess(fixed, first, target):
    from compressor.evaluate.latency_model import search_depth

    n = 30

    def speedup(k):  # latency = fixed + (1 - fixed) x kept / n, with a small non-linearity
        return 1 / (fixed + (1 - fixed) * ((n - k) / n) ** 1.1)

    want = next(k for k in range(1, n) if speedup(k) >= target)
    probed = []
    got = search_depth(first, lambda k: probed.append(k) or speedup(k), target, n, max_probes=4)
    assert got == want, probed
    assert len(probed) <= 4 and len(set(probed)) == len(probed)


def test_depth_search_counts_and_respects_known_measurements():
    from compressor.evaluate.latency_model import search_depth

    def speedup(k):
        return 1 / (0.1 + 0.9 * (30 - k) / 30)

    probed = []
    want = next(k for k in range(30) if speedup(k) >= 1.3)  # 8
    # 10 blocks measured before the search (reached 1.3x): the search only looks below it
    got = search_depth(9, lambda k: probed.append(k) or speedup(k), 1.3, 30, 4, known={10: speedup(10)})
    assert got == want and probed and max(probed) < 10 and len(probed) <= 3
    # 7 blocks: the secant through 8 predicts 1.266x, 2.6% short of 1.3x, so it is not measured ...
    assert want - 1 not in probed
    # ... unless the search is told to trust predictions less than that
    probed.clear()
    got = search_depth(9, lambda k: probed.append(k) or speedup(k), 1.3, 30, 4, known={10: speedup(10)}, trust=0.03)
    assert got == want and want - 1 in probed
    # a target no depth reaches: the search ends with None, even when its guess runs into n - 1
    assert search_depth(28, lambda k: 1.0 + 0.001 * k, 1.5, 30, 4) is None
    # both neighbours known: nothing left to measure
    assert search_depth(5, lambda k: 1 / 0, 1.3, 30, 4, known={7: speedup(7), 8: speedup(8)}) == 8
