"""Quantization-aware healing: the fake quantizer against ONNX Runtime's quantizer, its straight-through
gradient, and `compress heal --quantization-aware int4` then `compress export --precision int4` writing
exactly the integers the healing trained through."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, run_cli, tiny_model
from heal_fixtures import one_thread, windows  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from compressor.heal import HealConfig, heal
from compressor.heal.quantaware import plan_quantization
from compressor.quantize import blockwise
from compressor.quantize.fake import blocks_of, fake_quantize, ort_codes, record_of
from compressor.surgery.edit import save_checkpoint

GRIDS = [(4, 32, "asymmetric"), (8, 64, "symmetric"), (4, 32, "symmetric"), (8, 32, "asymmetric")]


def tied_llama(seed: int = 0):
    """A tiny tied Llama the builder exports (GQA head size a multiple of 16)."""
    return tiny_model("llama", seed=seed, hidden_size=64, head_dim=16, intermediate_size=128, tie_word_embeddings=True)


@pytest.mark.parametrize("bits, block, grid", GRIDS)
def test_fake_quantize_is_dequantize_of_quantize(bits, block, grid):
    """fake_quantize against blockwise.rtn (ONNX Runtime's C++ quantizer) then BlockQuant.dequantize,
    on weights with an all-zero block, one-signed blocks and a K that is not a whole number of blocks."""
    g = torch.Generator().manual_seed(bits + block)
    w = torch.randn(48, 3 * block + block // 2, generator=g) * 0.05
    w[0, :block] = 0
    w[1] = w[1].abs()
    w[2] = -w[2].abs()
    reference = blockwise.rtn(w.T.numpy(), bits, block, grid)
    np.testing.assert_array_equal(fake_quantize(w, bits, block, grid).numpy(), reference.dequantize().T)
    codes, scale, zp = ort_codes(blocks_of(w, block), bits, grid)
    k = w.shape[1]
    np.testing.assert_array_equal(codes.reshape(48, -1)[:, :k].numpy(), reference.codes.reshape(48, -1)[:, :k])
    np.testing.assert_array_equal(scale.numpy(), reference.scales)
    if reference.zero_points is not None:
        np.testing.assert_array_equal(zp.numpy(), reference.zero_points)


@pytest.mark.parametrize("bits, block, grid", GRIDS)
def test_halves_round_away_from_zero_as_onnx_runtime_does(bits, block, grid):
    """Weights that land exactly halfway between two codes: ORT rounds them away from zero, where
    torch.round (and numpy) would round to even; the fake quantizer must take ORT's side."""
    half = 2 ** (bits - 1)
    w = torch.zeros(4, block)
    w[:, 0] = -half  # symmetric: scale 1, zero point half; codes are w + half
    w[:, 1:7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    if grid == "asymmetric":
        w[:, 7] = 2**bits - 1 - half  # range [-half, 2**bits - 1 - half]: scale 1, zero point half
    reference = blockwise.rtn(w.T.numpy(), bits, block, grid)
    codes = ort_codes(blocks_of(w, block), bits, grid)[0]
    np.testing.assert_array_equal(codes[:, 0].numpy(), reference.codes[:, 0])
    even = torch.round(w[:, 1:7] + half)
    assert (even != codes[:, 0, 1:7]).any()  # the halves this test is about really are ties


def test_gradients_flow_straight_through_to_the_latent_weights():
    w = (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_(True)
    upstream = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    out = fake_quantize(w, 4, 32, "asymmetric")
    assert not torch.equal(out, w)  # it does quantize
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)  # d fake / d w = identity


def test_healing_trains_the_latent_weights_and_leaves_a_plain_model():
    teacher = tied_llama()
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ids = windows(8, 16)
    result = heal(student, teacher, ids, ids[:2], HealConfig(steps=3, train="all", lr=1e-3, teacher_cache=None,
                                                             quantization_aware="int4", batch_size=2))
    assert result.steps == 3
    assert set(student.state_dict()) == set(before)  # no parametrization left behind
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    record = record_of(student)
    assert record.precision == "int4" and "lm_head" in record.int8 and record.tied_embedding
    assert result.quantization_aware == record.to_dict()
    # a plain healing afterwards moves the weights off that grid and drops the record
    heal(student, teacher, ids, None, HealConfig(steps=1, train="all", teacher_cache=None))
    assert record_of(student) is None


def test_eight_bit_choice_keeps_fused_projections_together():
    record = plan_quantization(tied_llama(), "int4")
    for layer in range(4):
        qkv = {record.bits_of(f"model.layers.{layer}.self_attn.{p}_proj") for p in "qkv"}
        assert len(qkv) == 1  # one MatMul in the builder's graph: one width
    assert record.bits_of("lm_head") == 8 and len(record.int8) > 1


def _nbits(path):
    """{node name: (bits, block size, codes [N, K], scales, zero points [N, blocks])} of MatMulNBits nodes."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in node.attribute}
        bits, block, k = a["bits"], a["block_size"], a["K"]
        packed = inits[node.input[1]]
        n, blocks = packed.shape[0], packed.shape[1]
        if bits == 4:
            codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, blocks * block)
        else:
            codes = packed.reshape(n, blocks * block)
        if len(node.input) > 3:
            z = inits[node.input[3]]
            zp = np.stack([z & 0xF, z >> 4], axis=-1).reshape(n, -1)[:, :blocks] if bits == 4 else z.reshape(n, -1)
        else:
            zp = np.full((n, blocks), 2 ** (bits - 1))
        out[node.name] = (bits, block, codes[:, :k], inits[node.input[2]].reshape(n, blocks), zp)
    return out, graph


def _modules_of(node: str) -> list[str]:
    """The Linear modules a builder node name stands for (its own naming, read independently here)."""
    if node.startswith("/lm_head/"):
        return ["lm_head"]
    layer, part, proj = re.match(r"/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul", node).groups()
    prefix = f"model.layers.{layer}.{'self_attn' if part == 'attn' else 'mlp'}"
    return [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")] if proj == "qkv_proj" else [f"{prefix}.{proj}"]


def test_export_writes_the_integers_the_healing_trained(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    teacher = tied_llama()
    save_checkpoint(teacher, make_tokenizer(), tmp_path / "teacher")
    words = list(make_tokenizer().get_vocab())
    rng = np.random.default_rng(0)
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(words, 4000)))
    run = run_cli("heal", tmp_path / "teacher", "--teacher", tmp_path / "teacher", "--out", tmp_path / "healed",
                  "--data", tmp_path / "text.txt", "--quantization-aware", "int4", "--train", "all", "--lr", "1e-2",
                  "--steps", "3", "--seq-len", "16", "--samples", "8", "--eval-samples", "2", "--batch-size", "2",
                  "--teacher-cache", "off")
    assert run.returncode == 0, run.stderr
    assert "--precision int4` writes them" in " ".join(run.stderr.split())  # the console wraps long paths
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")  # a standard checkpoint
    record = record_of(healed)
    assert record is not None and record.precision == "int4"
    weights = {n: m.weight.detach() for n, m in healed.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(not torch.equal(weights[n], w) for n, w in
               ((n, m.weight) for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)))

    run = run_cli("export", tmp_path / "healed", "--out", tmp_path / "onnx", "--precision", "int4", "--no-validate")
    assert run.returncode == 0, run.stderr
    nodes, graph = _nbits(tmp_path / "onnx" / "model.onnx")
    assert len(nodes) == len(weights) - 2 * 4  # q, k and v are one node in each of the 4 layers
    for node, (bits, block, codes, scales, zp) in nodes.items():
        names = _modules_of(node.removesuffix(f"_Q{bits}"))
        specs = {record.spec(n) for n in names}
        assert specs == {(bits, block, record.grid if bits == 4 else record.int8_grid)}, node
        w = torch.cat([weights[n] for n in names])  # [N, K]: fused columns side by side
        want, want_scale, want_zp = ort_codes(blocks_of(w.float(), block), bits, next(iter(specs))[2])
        np.testing.assert_array_equal(codes, want.reshape(w.shape[0], -1)[:, : w.shape[1]].numpy(), err_msg=node)
        np.testing.assert_array_equal(scales, want_scale.numpy(), err_msg=node)
        np.testing.assert_array_equal(zp, want_zp.numpy(), err_msg=node)
    assert nodes["/lm_head/MatMul_Q8"][0] == 8
    # the embedding reads the lm_head's quantized weight, the one the healing trained through
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in graph.node if n.output[0] == gather.input[0])
    head = next(n for n in graph.node if n.name == "/lm_head/MatMul_Q8")
    assert reshape.input[0] == head.input[1]


def test_a_bad_value_is_one_line_and_writes_nothing(tmp_path):
    save_checkpoint(tied_llama(), make_tokenizer(), tmp_path / "teacher")
    run = run_cli("heal", tmp_path / "teacher", "--teacher", tmp_path / "teacher", "--out", tmp_path / "healed",
                  "--quantization-aware", "int3")
    assert run.returncode == 2
    assert "--quantization-aware must be int4 or int8" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "healed").exists()
