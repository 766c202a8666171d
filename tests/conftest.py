"""Shared fixtures: tiny random models of every architecture in the adapter table (no downloads), the
packaged SmolLM2 loaded once per session, and the real `compress` entry point run in this process.

Every test session gets its own empty COMPRESSOR_CACHE (subprocesses and pytest-xdist workers inherit
it): tests never read or write the user's cache, and a warm cache cannot hide a cold-start bug. Set
COMPRESSOR_TEST_CACHE to a directory to share one between sessions on purpose (`make test` does, for
its two pytest runs).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

if os.environ.get("COMPRESSOR_TEST_CACHE"):
    os.environ["COMPRESSOR_CACHE"] = os.environ["COMPRESSOR_TEST_CACHE"]
elif os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("COMPRESSOR_SESSION_CACHE"):
    os.environ["COMPRESSOR_CACHE"] = os.environ["COMPRESSOR_SESSION_CACHE"]  # the controller's, inherited
else:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="compressor-test-cache-")
    os.environ["COMPRESSOR_CACHE"] = os.environ["COMPRESSOR_SESSION_CACHE"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, True)

_DEC = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 128, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_KV = dict(_DEC, num_key_value_heads=2, head_dim=8)
_GPT = {"n_embd": 32, "n_layer": 4, "n_head": 4, "vocab_size": 128, "n_positions": 256, "bos_token_id": 1, "eos_token_id": 2}

# model_type -> config kwargs for a 4-block, 32-wide model.
TINY_CONFIGS: dict[str, dict] = {
    "gpt2": _GPT,
    "gpt_bigcode": _GPT,
    "gptj": dict(_GPT, rotary_dim=4),
    "codegen": dict(_GPT, rotary_dim=4),
    "gpt_neox": dict(_DEC, rotary_pct=0.25),
    "opt": dict(_DEC, ffn_dim=64, word_embed_proj_dim=32),
    "bloom": {"hidden_size": 32, "n_layer": 4, "n_head": 4, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1,
                  "eos_token_id": 2},
    "falcon": dict(_DEC, new_decoder_architecture=False, parallel_attn=True, alibi=False),
    "llama": _KV,
    "mistral": dict(_KV, sliding_window=None),
    "qwen2": _KV,
    "qwen3": _KV,
    "gemma": _KV,
    "gemma2": dict(_KV, sliding_window=16),
    "gemma3_text": dict(_KV, sliding_window=16),
    "phi3": dict(_DEC, num_key_value_heads=2),
    "phi": _DEC,
    "stablelm": _KV,
    "starcoder2": _KV,
    "olmo": _KV,
    "olmo2": _KV,
    "granite": _KV,
    "cohere": _KV,
    "smollm3": _KV,
}


def tiny_gemma3_multimodal(seed: int = 0, num_hidden_layers: int = 3):
    """A tiny Gemma3ForConditionalGeneration (a 1-layer vision tower; text blocks at
    model.language_model.layers, their config in config.text_config). Not in TINY_CONFIGS: the
    `arch` fixture's tests (export among them) are about text-only models."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(_KV, num_hidden_layers=num_hidden_layers, sliding_window=16)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name:
                p.mul_(2.0)
    return model.eval()


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random CausalLM of the given architecture, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves residual updates tiny; scale weights up so blocks matter in comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name:
                p.mul_(2.0)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny Llama checkpoint with a small word-level tokenizer; returns its path. Heads of 16, so
    that onnxruntime-genai's builder exports it, as it does SmolLM2 (the route most users get; it is
    also twice as fast as tracing with torch.onnx here)."""
    path = tmp_path / "tiny-llama"
    model = tiny_model("llama", head_dim=16, max_position_embeddings=1024)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_tokenizer():
    """A 128-token word-level tokenizer built offline (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "this", "are", "or", "from", "at", "an", "which", "not", "function", "return", "value", "class", "object", "python", "list", "string", "module", "type", "error", "file", "data", "name", "used", "can", "if", "method", "default", "new", "code", "set", "when", "has"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()":
        if len(vocab) < 128:
            vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


# --- the packaged SmolLM2, once per session ------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_pair():
    """(model, tokenizer) of the packaged SmolLM2-135M in float32, loaded once for the whole session.
    Shared: a test that changes the model must work on `copy.deepcopy(model)` (see `smollm2`)."""
    import fcntl

    pytest.importorskip("gguf")
    from compressor.loading import load_model

    try:
        # pytest-xdist workers share the cache: one dequantizes the GGUF, the other waits and reads it
        os.makedirs(os.environ["COMPRESSOR_CACHE"], exist_ok=True)
        with open(os.path.join(os.environ["COMPRESSOR_CACHE"], ".smollm2.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return load_model("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 (the package is an install step; say which)
        pytest.skip(f"the packaged SmolLM2 is not available: {exc}")


@pytest.fixture
def smollm2(smollm2_pair):
    """A private copy of the session's SmolLM2 (model, tokenizer): change it freely."""
    import copy

    model, tokenizer = smollm2_pair
    return copy.deepcopy(model), tokenizer


# --- folders built once per test run ------------------------------------------------------------

def shared_folder(name: str, build, dest) -> Path:
    """Build a folder once per test run and copy it to `dest` (a new path) for the caller.

    `build(folder)` fills an empty folder. pytest-xdist's workers share the run's cache: the first to
    ask builds under a lock, the others wait and copy (a torch.onnx trace of a tiny model costs 10 s,
    so tests of one module that land on both workers would otherwise trace it twice). Each caller gets
    its own copy, so tests may write into theirs. `name` must say everything `build` depends on."""
    import fcntl

    root = Path(os.environ["COMPRESSOR_CACHE"]) / "test-folders"
    root.mkdir(parents=True, exist_ok=True)
    done = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_dir():
            work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            build(work)
            work.rename(done)
    shutil.copytree(done, dest)
    return Path(dest)


# --- the CLI in this process ---------------------------------------------------------------------

@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, env: dict | None = None) -> CliResult:
    """`compress ARGS` through the real entry point (`compressor.cli.main`) in this process: its exit
    code, stdout and stderr, as a subprocess would see them, without the few seconds a new Python
    spends importing torch. Logging and the environment are restored afterwards. Signals and the
    console script itself are tested in subprocesses."""
    from compressor import cli

    root, pkg = logging.getLogger(), logging.getLogger("compressor")
    handlers, root_level, pkg_level = root.handlers[:], root.level, pkg.level  # main() configures logging
    out, err = io.StringIO(), io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in (env or {}).items():
                mp.setenv(key, str(value))
            mp.setattr(sys, "argv", ["compress", *map(str, args)])
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        pkg.setLevel(pkg_level)
    return CliResult(code, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(config, items):
    """The SmolLM2 tests, the longest, first; the rest in their usual order. pytest-xdist's two workers
    then finish together: the short tests fill in at the end, instead of one long test running alone."""
    items.sort(key=lambda item: item.get_closest_marker("smollm2") is None)
