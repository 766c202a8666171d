"""onnxruntime-genai: its model builder as the fast export route, and its model folders.

The builder (Microsoft's `onnxruntime_genai.models.builder`) writes graphs with ONNX Runtime's
fused contrib ops (GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization), which
decode faster on ONNX Runtime CPU than torch.onnx's graphs of the same model. It builds offline from
a local Hugging Face directory, so compressor saves the (pruned) model as a checkpoint and runs it
in a child process (`_build`): the builder prints progress on stdout, which `--json` must keep clean.

Which adapter families it exports is the adapter table's `genai_builder` column; `builder_refusal`
adds the limits of its CPU kernels. Every ONNX folder compressor writes is a genai model folder:
the builder writes its own genai_config.json, `write_genai_config` writes one for torch.onnx graphs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from compressor.adapters import get_adapter
from compressor.errors import CompressorError
from compressor.util.io import write_json
from compressor.util.progress import status

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# builder precision and execution provider per compressor precision
BUILDER_TARGETS = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda"), "bf16": ("bf16", "cuda")}
_BUILDER_TIMEOUT_S = 3600
_BUILDER = "onnxruntime_genai.models.builder"


class BuilderError(CompressorError):
    """onnxruntime-genai's model builder failed on this model."""


def genai_available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def builder_refusal(model, has_tokenizer: bool = True) -> str | None:
    """Why the builder route cannot export `model`, or None when it can."""
    config = model.config
    adapter = get_adapter(model)
    if not adapter.genai_builder:
        return f"onnxruntime-genai's builder does not export '{adapter.name}' models"
    if not has_tokenizer:
        return "onnxruntime-genai's builder needs the model's tokenizer (the model came without one)"
    if not genai_available():
        return "onnxruntime-genai is not installed (pip install 'compressor[genai]')"
    heads = config.num_attention_heads
    head = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        # its GroupQueryAttention then needs a cache buffer of at least the window from the first step
        return "the builder's sliding-window attention runs only on genai's fixed-size cache buffers"
    if head % 16:
        # ORT's CPU GroupQueryAttention kernel refuses other head sizes at run time
        return f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16 (this model: {head})"
    return None


def run_builder(model, tokenizer, out_dir: Path, precision: str = "fp32") -> float:
    """Build `model` with onnxruntime-genai's builder into `out_dir`; returns the seconds it took."""
    from compressor.surgery.edit import save_checkpoint

    builder_precision, provider = BUILDER_TARGETS[precision]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compressor-builder-") as tmp:
        checkpoint, cache = Path(tmp) / "checkpoint", Path(tmp) / "cache"
        checkpoint.mkdir()
        status("saving the checkpoint for onnxruntime-genai's builder")
        save_checkpoint(model, tokenizer, checkpoint)
        status(f"building the {builder_precision} graph with onnxruntime-genai's builder")
        argv = ["-i", str(checkpoint), "-o", str(out_dir), "-p", builder_precision, "-e", provider, "-c", str(cache)]
        code, output = _build(argv, Path(tmp) / "builder.log")
    log.debug("builder output:\n%s", output[-8000:])
    if code is None:
        raise BuilderError(f"onnxruntime-genai's builder did not finish within {_BUILDER_TIMEOUT_S:g} s and "
                           "was stopped: export with --route dynamo instead")
    if code != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        raise BuilderError(f"onnxruntime-genai's builder failed: {lines[-1] if lines else code} "
                           "(use --route dynamo, or COMPRESSOR_DEBUG=1 for its output)")
    return round(time.perf_counter() - start, 2)


def _build(argv: list[str], log_file: Path) -> tuple[int | None, str]:
    """Run `python -m onnxruntime_genai.models.builder ARGV` in a child process: (exit code, or None when it ran
    past _BUILDER_TIMEOUT_S and was killed; its stdout and stderr together).

    Where the platform forks, the child comes from a fork server that imported the builder once (torch,
    transformers, onnx: about 6 s a process on two cores), so each later build starts in a fraction of a
    second; elsewhere it is a fresh interpreter. Either way the builder runs in its own process, with this
    process's environment, and its output goes to `log_file`."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        with open(log_file, "w") as sink:
            try:
                done = subprocess.run([sys.executable, "-m", _BUILDER, *argv], stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=_BUILDER_TIMEOUT_S, check=False)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = None
        return code, log_file.read_text(errors="replace")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([_BUILDER])
    child = context.Process(target=_builder_child, args=(argv, str(log_file), dict(os.environ)))
    # multiprocessing re-runs the caller's main script in the child (a user's script without a
    # `__name__ == "__main__"` guard would compress again there); the builder needs none of it
    main, sys.modules["__main__"] = sys.modules["__main__"], types.ModuleType("__main__")
    try:
        child.start()
    finally:
        sys.modules["__main__"] = main
    try:
        child.join(_BUILDER_TIMEOUT_S)
    finally:
        timed_out = child.is_alive()  # past its time, or this process was interrupted
        if timed_out:
            child.kill()
            child.join()
    return (None if timed_out else child.exitcode), log_file.read_text(errors="replace") if log_file.is_file() else ""


def _builder_child(argv: list[str], log_file: str, environ: dict) -> None:
    """In the child (multiprocessing has moved it to the caller's working directory): the builder's own
    `__main__`, with the caller's environment, its output in `log_file` (it prints progress, which must not
    reach this tool's stdout). An exception or sys.exit sets the exit code, as in a fresh interpreter."""
    import runpy

    os.environ.clear()
    os.environ.update(environ)
    sink = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    sys.argv = [_BUILDER, *argv]
    runpy.run_module(_BUILDER, run_name="__main__", alter_sys=True)


def write_genai_config(model, out_dir: Path, cache_shape: tuple[int, int], filename: str = "model.onnx") -> Path:
    """genai_config.json for a torch.onnx graph (Optimum names, position_ids, no shared buffer).

    cache_shape: (kv heads, head size) of one layer's cache, read from the model's own cache.
    The graph concatenates past and new tokens, so genai must not share past and present buffers.
    """
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
    tokens = {k: _first(getattr(config, k, None)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tokens["pad_token_id"] = tokens["pad_token_id"] if tokens["pad_token_id"] is not None else tokens["eos_token_id"]
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": cache_shape[1], "hidden_size": hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": heads, "num_hidden_layers": get_adapter(model).num_blocks(model),
        "num_key_value_heads": cache_shape[0],
    }
    data = {
        # "llama" is genai's plain decoder-only type: it reads the I/O names above and adds nothing
        "model": {**tokens, "context_length": context, "decoder": decoder, "type": "llama",
                  "vocab_size": config.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    path = Path(out_dir) / GENAI_CONFIG
    write_json(path, data)
    return path


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def genai_generate(folder: Path | str, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own generator loop on an export folder (stops at EOS)."""
    og = _genai()
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


def _genai():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise CompressorError("onnxruntime-genai is not installed: pip install 'compressor[genai]'") from exc
    return onnxruntime_genai


def read_genai_config(folder: Path) -> dict:
    path = Path(folder) / GENAI_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}
