"""The adapter table: everything compressor knows about each decoder architecture.

No other module tests model names. Adding an architecture is adding a row here (and a
tiny config in tests/conftest.py so the test suite exercises it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compressor.errors import InvalidPlanError, UnsupportedArchitectureError


def _opt_post_norm(config) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "this OPT variant is post-norm: the MLP output passes a LayerNorm before the residual"
    return None


_SANDWICH = "the MLP output passes a norm (post_feedforward_layernorm) before it joins the residual"


@dataclass(frozen=True)
class Adapter:
    """Where things live in one family of decoder-only models.

    blocks: dotted path from the CausalLM to the ModuleList of decoder blocks.
    layer_count: config fields that hold the number of blocks.
    per_layer_lists: config fields that are lists with one entry per block.
    layer_idx: submodules of a block ("" is the block itself) whose `layer_idx` attribute
        indexes the KV cache and must be renumbered after surgery.
    residual: "sequential" (x + attn, then + mlp) or "parallel" (x + attn(x) + mlp(x)).
    norm: "pre" (norm inside the branch, branch output added as is), "post" or "sandwich".
    mlp_out: path inside a block of the projection whose output is added to the residual.
    fold_refusal: why a linear map cannot be folded into `mlp_out` (None when it can).
    genai_builder: onnxruntime-genai's model builder exports this family (compressor's fast
        export route, `compressor.export.genai`); the others export through torch.onnx.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    mlp_out: str
    layer_count: tuple[str, ...] = ("num_hidden_layers",)
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    layer_idx: tuple[str, ...] = ("self_attn",)
    residual: str = "sequential"
    norm: str = "pre"
    fold_refusal: Callable[[object], str | None] | str | None = None
    extra_lists: tuple[str, ...] = field(default=())
    genai_builder: bool = False

    # --- accessors used by surgery, calibrate and export -------------------------------
    def blocks_of(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.blocks)

    def num_blocks(self, model: torch.nn.Module) -> int:
        return len(self.blocks_of(model))

    def mlp_out_of(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.get_submodule(self.mlp_out)

    def why_no_fold(self, config) -> str | None:
        if callable(self.fold_refusal):
            return self.fold_refusal(config)
        return self.fold_refusal


_ROWS = [
    Adapter("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", ("n_layer",), layer_idx=("attn",)),
    Adapter("gpt_bigcode", ("gpt_bigcode",), "transformer.h", "mlp.c_proj", ("n_layer",), layer_idx=("attn",)),
    Adapter("gptj", ("gptj",), "transformer.h", "mlp.fc_out", ("n_layer",), layer_idx=("attn",),
            residual="parallel"),
    Adapter("codegen", ("codegen",), "transformer.h", "mlp.fc_out", ("n_layer",), layer_idx=("attn",),
            residual="parallel"),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", layer_idx=("attention",),
            residual="parallel"),
    Adapter("opt", ("opt",), "model.decoder.layers", "fc2", fold_refusal=_opt_post_norm),
    Adapter("bloom", ("bloom",), "transformer.h", "mlp.dense_4h_to_h", ("n_layer",),
            layer_idx=("self_attention",)),
    Adapter("falcon", ("falcon",), "transformer.h", "mlp.dense_4h_to_h", layer_idx=("self_attention",),
            residual="parallel"),
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "phi3", "stablelm", "olmo", "smollm3",
                      "ministral", "ministral3", "cohere", "glm", "helium", "arcee", "starcoder2", "gemma"),
            "model.layers", "mlp.down_proj", extra_lists=("no_rope_layers",)),
    Adapter("phi", ("phi",), "model.layers", "mlp.fc2", residual="parallel"),
    Adapter("granite", ("granite",), "model.layers", "mlp.down_proj",
            fold_refusal="Granite scales each branch by residual_multiplier before the residual"),
    Adapter("gemma2", ("gemma2", "gemma3_text", "olmo2", "olmo3"), "model.layers", "mlp.down_proj",
            layer_idx=("", "self_attn"), norm="sandwich", fold_refusal=_SANDWICH),
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): the text blocks sit one level
    # deeper, and their config fields live in config.text_config (surgery updates both configs).
    Adapter("gemma3", ("gemma3",), "model.language_model.layers", "mlp.down_proj",
            layer_idx=("", "self_attn"), norm="sandwich", fold_refusal=_SANDWICH),
]

# Families whose row differs only in details the row above does not need.
_OVERRIDES = {
    "starcoder2": {"mlp_out": "mlp.c_proj"},
    "cohere": {"residual": "parallel"},
}

# Families the builder exports and whose exports equal PyTorch (tests/export/test_genai.py). Its
# phi3, smollm3 and gemma3_text paths fail on current transformers configs; gemma2's sliding
# layers need genai's fixed-size cache buffers (see compressor.export.genai.builder_refusal); its
# olmo graph exports but differs from PyTorch (logits off by 0.17 on a tiny model).
_GENAI_BUILDER = {"llama", "mistral", "qwen2", "qwen3", "gemma", "granite"}

ADAPTERS: dict[str, Adapter] = {}
for _row in _ROWS:
    for _mt in _row.model_types:
        _kw = {"genai_builder": _mt in _GENAI_BUILDER, **_OVERRIDES.get(_mt, {})}
        ADAPTERS[_mt] = Adapter(**{**_row.__dict__, "name": _mt, "model_types": (_mt,), **_kw})


def supported() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> Adapter:
    """The adapter for a model or config, or a clear error listing what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    # Multimodal wrappers (Gemma 3) keep the text model's config inside.
    text_config = getattr(config, "text_config", None)
    if model_type not in ADAPTERS and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(supported())}"
        ) from None


def check_foldable(model, what: str, remedy: str) -> None:
    """Refuse, naming the adapter's reason and `remedy`, when `model` cannot hold a linear map folded
    into its MLP output projections (the one place this refusal is worded)."""
    reason = get_adapter(model).why_no_fold(model.config)
    if reason:
        raise InvalidPlanError(f"cannot {what}: {model.config.model_type} cannot fold a linear map into its MLP "
                               f"output projection ({reason}); {remedy}")
