"""Block removal on every architecture in the adapter table, checked against plain transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_gemma3_multimodal, tiny_model
from transformers import AutoModelForCausalLM

from compressor.adapters import ADAPTERS, get_adapter
from compressor.blocks import parse_blocks
from compressor.errors import InvalidPlanError, UnsupportedArchitectureError
from compressor.surgery.edit import drop_blocks_, fold_linear_, save_checkpoint


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_every_adapter_row_has_a_tiny_config():
    assert set(ADAPTERS) <= set(TINY_CONFIGS) | {
        "gemma3",  # multimodal: tiny_gemma3_multimodal, tested below
        "ministral", "ministral3", "glm", "helium", "arcee", "olmo3"}


def test_gemma3_multimodal_blocks_are_found_and_dropped_under_text_config():
    """Gemma3ForConditionalGeneration keeps its text blocks at model.language_model.layers and their
    config in text_config; before its adapter row, this raised a raw AttributeError (model.layers)."""
    model = tiny_gemma3_multimodal(num_hidden_layers=3)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = model.model.language_model.layers
    assert list(get_adapter(model).blocks_of(model)) == list(layers)

    def skip(module, args, kwargs, output):  # block 1 as the identity: its input passes through
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layers[1].register_forward_hook(skip, with_kwargs=True)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    handle.remove()
    drop_blocks_(model, [1])
    assert model.config.text_config.num_hidden_layers == 2 and len(model.config.text_config.layer_types) == 2
    assert [b.self_attn.layer_idx for b in model.model.language_model.layers] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected)
    with pytest.raises(InvalidPlanError, match="post_feedforward_layernorm"):
        fold_linear_(model, 0, torch.eye(32))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_drop_save_reload_generate(model_type, tmp_path):
    model = tiny_model(model_type)
    original_blocks = list(get_adapter(model).blocks_of(model))
    drop_blocks_(model, [1, 2])

    adapter = get_adapter(model)
    blocks = adapter.blocks_of(model)
    assert [id(b) for b in blocks] == [id(original_blocks[0]), id(original_blocks[3])]
    # Every cache index must match the block's new position (the table must name them all).
    for position, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                assert module.layer_idx == position, f"{name or 'block'}.layer_idx not renumbered"

    save_checkpoint(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert get_adapter(reloaded).num_blocks(reloaded) == 2
    assert reloaded.config.compressor == {"blocks_original": 4, "kept": [0, 3], "removed": [1, 2],
                                          "linearized": []}
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        expected = greedy_without_cache(reloaded, ids[:1], 6)
        got = reloaded.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6,
                                do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, expected)


def test_pruned_model_differs_from_unpruned_and_twice_pruned_records_original_indices():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 8))
    before = model(ids).logits
    drop_blocks_(model, [0])
    assert not torch.allclose(model(ids).logits, before)
    drop_blocks_(model, [1])  # current block 1 is original block 2
    assert model.config.compressor["removed"] == [0, 2]
    assert model.config.compressor["kept"] == [1, 3]


@pytest.mark.parametrize("spec, message", [
    ("7", "out of range"), ("0-3", "cannot remove all"), ("1,1", "repeat"), ("x", "cannot read"),
    ("3-1", "empty"), ("", "no blocks"),
])
def test_parse_blocks_rejects(spec, message):
    with pytest.raises(InvalidPlanError, match=message):
        parse_blocks(spec, 4)


def test_parse_blocks_ranges():
    assert parse_blocks("3,5-7,0", 10) == [0, 3, 5, 6, 7]


def test_unsupported_architecture_lists_supported():
    from transformers import AutoConfig

    config = AutoConfig.for_model("t5")
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama"):
        get_adapter(config)


def test_copy_without_blocks_shares_weights_and_equals_a_deep_copy_with_the_drop():
    import copy

    from compressor.surgery.edit import copy_without_blocks

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    drop_blocks_(reference, [1, 2])
    clone = copy_without_blocks(model, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert get_adapter(model).num_blocks(model) == 4 and model.config.num_hidden_layers == 4
    assert clone.model.layers[1].mlp.down_proj.weight is model.model.layers[3].mlp.down_proj.weight
    owned = copy_without_blocks(model, own=[model.model.layers[0].mlp.down_proj])
    assert owned.model.layers[0].mlp.down_proj.weight is not model.model.layers[0].mlp.down_proj.weight
    assert owned.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
