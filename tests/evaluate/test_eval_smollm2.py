"""`compress bench` perplexity of the real SmolLM2-135M against Hugging Face's recipe written out here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from compressor.cli.bench import bench

pytestmark = pytest.mark.smollm2


def hf_recipe_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """Strided windows, context labelled -100, the model's own loss weighted by its scored tokens."""
    total, count, prev_end, n = 0.0, 0, 0, ids.size(1)
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : window.size(1) - (end - prev_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            total += float(model(input_ids=window, labels=labels).loss) * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return total / count


def test_bench_perplexity_equals_the_recipe(tmp_path, smollm2_pair):
    from pydoc_data.topics import topics

    model, tokenizer = smollm2_pair
    text = "\n\n".join(topics[k] for k in sorted(topics)[:8])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :768]
    text = tokenizer.decode(ids[0])
    ids = tokenizer(text, return_tensors="pt").input_ids
    (tmp_path / "fixed.txt").write_text(text)
    expected = hf_recipe_nll(model, ids, 512, 256)

    app = typer.Typer()
    app.command()(bench)
    result = CliRunner().invoke(app, [
        "smollm2-135m", "--eval", str(tmp_path / "fixed.txt"), "--prefill", "none", "--decode", "none",
        "--out", str(tmp_path / "bench.json"), "--json",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ppl = json.loads(result.stdout)["perplexity"]
    assert ppl["tokens"] == ids.size(1) - 1 and (ppl["max_length"], ppl["stride"]) == (512, 256)
    assert ppl["nll"] == pytest.approx(expected, rel=1e-4)
    assert ppl["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
