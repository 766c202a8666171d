"""The front door: `import compressor` stays light, the one-call API compresses a tiny model, and the
README's Python snippet runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
HEAVY = ("onnx", "onnxruntime", "onnxruntime_genai", "peft", "matplotlib", "tensorrt", "modelopt")
FAST = {"backend": "torch", "threads": 1, "prefill_tokens": 32, "new_tokens": 8, "samples": 8, "seq_len": 32,
        "heal_steps": 2, "timing_seconds": 0.2, "format": "none"}


def test_import_is_light_and_verbs_resolve():
    code = ("import sys, compressor\n"
            "verbs = [compressor.compress, compressor.profile, compressor.plan_blocks, compressor.apply_plan_,\n"
            "         compressor.prune_, compressor.heal_, compressor.Report, compressor.perplexity]\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    import compressor

    assert compressor.prune_ is __import__("compressor.surgery.edit", fromlist=["x"]).drop_blocks_
    with pytest.raises(AttributeError):
        _ = compressor.no_such_verb


def test_compress_a_model_in_memory_writes_nothing(tmp_path, monkeypatch):
    import compressor

    monkeypatch.chdir(tmp_path)
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setenv("COMPRESSOR_CACHE", str(cache))
    model, tokenizer = tiny_model("llama"), make_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    pinned = 1 if threads != 1 else 2
    report = compressor.compress(model, tokenizer, max_ppl_increase=0.5, **{**FAST, "threads": pinned})
    assert isinstance(report, compressor.Report)
    # torch's process-wide thread count is the caller's again: every backend the run opened was closed
    from compressor.evaluate.backends import TorchBackend

    assert torch.get_num_threads() == threads
    with TorchBackend(model, threads=pinned):
        assert torch.get_num_threads() == pinned
    assert torch.get_num_threads() == threads
    assert report.blocks_original == 4 and 1 <= len(report.blocks_removed) <= 2
    # the user's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the original's perplexity: on the held-out end of the calibration text, and on a text of another source
    # (the first tokens of Python's documentation), each computed here
    from compressor.data import hold_out, load_texts, other_source, token_stream

    held, other = report.perplexity.original.items()
    ids = tokenizer(hold_out(load_texts(None), 0.15)[1], return_tensors="pt").input_ids[0][:8192]
    assert held[0] == "held-out bundled English (calibration source)"
    assert compressor.perplexity(model, ids, max_length=512, stride=256).perplexity == pytest.approx(held[1])
    ids = token_stream(tokenizer, other_source(None)[1])[:8192]
    assert other[0] == "Python documentation (other source)"
    assert compressor.perplexity(model, ids, max_length=512, stride=256).perplexity == pytest.approx(other[1])
    assert report.artifacts == {} and list(tmp_path.iterdir()) == []
    assert not cache.exists() or list(cache.rglob("*")) == []  # not even a cached profile
    assert json.loads(json.dumps(report.to_dict()))["schema_version"] == report.schema_version


def test_compress_refuses_bad_settings():
    import compressor

    with pytest.raises(compressor.CompressorError, match="unknown setting"):
        compressor.compress("x", target_speedup=1.2, no_such_setting=1)
    with pytest.raises(compressor.CompressorError, match="tokenizer"):
        compressor.compress(tiny_model("llama"), target_speedup=1.2)


def readme_snippet() -> str:
    blocks = re.findall(r"^## Python API\n.*?```python\n(.*?)```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert blocks, "README.md has no ```python block under ## Python API"
    return blocks[0]


@pytest.mark.slow  # the defaults of the one call: ONNX export, 2 s timings, 60 healing steps
def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    """The snippet verbatim, with only the model name pointed at a tiny 8-block checkpoint."""
    path = tmp_path / "tiny"
    tiny_model("llama", num_hidden_layers=8).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    snippet = readme_snippet()
    assert snippet.count('"smollm2-135m"') == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(  # noqa: S102 (the README snippet, run as written)
        snippet.replace('"smollm2-135m"', repr(str(path))), "README.md", "exec"), scope)
    report, model = scope["report"], scope["model"]
    assert report.speedup_measured > 1 and report.blocks_removed
    assert json.loads((tmp_path / "run" / "report.json").read_text())["blocks_removed"] == report.blocks_removed
    assert model.config.num_hidden_layers == 5  # the step-by-step half removed 3 of 8 blocks
