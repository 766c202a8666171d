"""Hugging Face Optimum's ORTModelForCausalLM loads compressor's export folders and generates
PyTorch's greedy tokens. It runs in an isolated environment (optimum_env.py) because optimum-onnx
0.1 pins transformers < 4.58. `make test` runs it where that environment is built (`make optimum-env`,
which `make test-all` runs first) and skips it elsewhere, saying so."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compressor.export.run import export_model
from compressor.export.validate import torch_greedy

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compressor[onnx]'")

_SCRIPT = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
model = ORTModelForCausalLM.from_pretrained(sys.argv[1], use_cache=True, use_io_binding=False)
ids = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False,
                     min_new_tokens=int(sys.argv[3]), eos_token_id=None, pad_token_id=0)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


@pytest.fixture(scope="module")
def optimum_python():
    import optimum_env

    python = optimum_env.built()
    if python is None:
        pytest.skip(f"the Optimum environment is not built ({optimum_env.default_folder()}): "
                    "`make optimum-env` builds it once (`make test-all` does too)")
    return python


def optimum_greedy(python, folder, prompt: list[int], new_tokens: int) -> list[int]:
    done = subprocess.run([str(python), "-c", _SCRIPT, str(folder), json.dumps(prompt), str(new_tokens)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("route, arch", [
    ("dynamo", "llama"),
    pytest.param("dynamo", "gpt2", marks=pytest.mark.slow),
    # Optimum loads the builder's graphs as "legacy" (no position_ids input) with a warning
    pytest.param("builder", "qwen3", marks=pytest.mark.slow),
])
def test_optimum_generates_pytorch_greedy_tokens(optimum_python, tmp_path, route, arch):
    if arch == "gpt2":
        model = tiny_model("gpt2", n_layer=2)
    else:
        model = tiny_model(arch, hidden_size=64, head_dim=16, num_hidden_layers=3)
    folder = tmp_path / "export"
    folder.mkdir()
    summary = export_model(model, make_tokenizer(), folder, route=route)
    assert summary.route == route
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    ref, _ = torch_greedy(model, prompt, 16)
    assert optimum_greedy(optimum_python, folder, prompt[0].tolist(), 16) == ref
