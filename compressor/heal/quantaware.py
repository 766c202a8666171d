"""Quantization-aware healing (--quantization-aware int4|int8): train through the export's quantizer.

Every Linear is read through a fake quantizer (compressor.quantize.fake) on the grid, block size and
bits that `compress export --precision int4|int8` gives it, with a straight-through gradient; a tied
input embedding shares its output projection's (the export's GatherBlockQuantized reads that quantized
weight). The latent float weights train and are saved: a standard checkpoint. What was trained is
recorded in model.config (config.json, `compressor_quantization_aware`); the export finds it there and
rounds to nearest on the same grid with the same 8-bit MatMuls, so its integers are the trained ones.

Which MatMuls stay 8-bit in a 4-bit model follows the export's rule (compressor.quantize.mixed): the
output projection, and by relative rounding error the most sensitive others up to `int8_fraction` of
the 4-bit weights. The export measures that error on the ONNX graph, where Linears that read one input
may be one MatMul (the builder fuses q, k and v), so here such Linears are chosen together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch.nn.utils import parametrize

from compressor.errors import CompressorError
from compressor.quantize.config import QuantConfig
from compressor.quantize.fake import PRECISIONS, FakeQuantizer, QuantAwareRecord, fake_quantize, set_record
from compressor.surgery.edit import compressor_record

log = logging.getLogger(__name__)


def plan_quantization(model: torch.nn.Module, precision: str, quant: QuantConfig | None = None) -> QuantAwareRecord:
    """The bits, grids and block sizes each Linear of `model` trains at, as the export will write them."""
    if precision not in PRECISIONS:
        raise CompressorError(f"--quantization-aware must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    bits = PRECISIONS[precision]
    config = dataclasses.replace(quant or QuantConfig(), bits=bits)
    config.validate()
    head = model.get_output_embeddings()
    tied = head is not None and config.embeddings == "auto" and \
        model.get_input_embeddings().weight is head.weight
    record = QuantAwareRecord(precision=precision, bits=bits, block_size=config.block_size,
                              grid=config.resolved_grid(bits), int8_block_size=config.block_for(8),
                              int8_grid=config.resolved_grid(8), tied_embedding=tied)
    if bits == 4 and config.keep_int8.strip() != "none":
        names = {id(m): n for n, m in model.named_modules()}
        if head is not None and isinstance(head, torch.nn.Linear):
            record.int8.append(names[id(head)])
        if config.keep_int8.strip() == "auto" and config.int8_fraction > 0:
            record.int8 += _most_sensitive(model, record, config.int8_fraction)
    return record


def _most_sensitive(model, record: QuantAwareRecord, fraction: float) -> list[str]:
    """The 4-bit Linear groups with the largest relative rounding error, up to `fraction` of the 4-bit
    weights (mixed.most_sensitive's rule, with uniform input weights as an uncalibrated export has)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = [g for g in sibling_groups(model) if all(record.bits_of(n) == 4 for n in g)]
    scores, sizes = {}, {}
    with torch.no_grad():
        for group in groups:
            err = norm = 0.0
            for n in group:
                w = weights[n].float()
                dq = fake_quantize(w, 4, record.block_size, record.grid)
                err += float((w - dq).square().sum())
                norm += float(w.square().sum())
            scores[tuple(group)] = err / max(norm, 1e-30)
            sizes[tuple(group)] = sum(weights[n].numel() for n in group)
    budget, used, chosen = fraction * sum(sizes.values()), 0, []
    for group in sorted(scores, key=scores.get, reverse=True):
        if used + sizes[group] <= budget:
            chosen += list(group)
            used += sizes[group]
    return chosen


@torch.no_grad()
def sibling_groups(model: torch.nn.Module) -> list[list[str]]:
    """Linears grouped by the input they read in one forward pass (q, k and v; gate and up)."""
    seen: dict[int, list[str]] = {}
    keep = []  # the inputs stay alive, so no id is reused during the pass

    def hook(name):
        def record(module, args):
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
        return record

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    grouped = {n for g in seen.values() for n in g}
    return list(seen.values()) + [[n] for n, _ in linears if n not in grouped]


@contextlib.contextmanager
def quantization_aware(student: torch.nn.Module, teacher, precision: str | None, train: str):
    """Within: `student` reads its Linears (and a tied embedding) through the export's fake quantizer.
    On a clean exit the record goes into student.config; the parametrizations are removed either way,
    leaving the trained latent weights. precision None: plain healing, which drops an earlier record
    (the weights move off the grid it trained for)."""
    if precision is None:
        yield None
        set_record(student, None)
        return
    if teacher is student:
        raise CompressorError("quantization-aware healing distills from the float model: pass a separate "
                              "teacher (a copy of the unquantized model)")
    if train == "touched" and not compressor_record(student)["removed"]:
        raise CompressorError("quantization-aware healing of a model with no removed blocks has nothing "
                              "'touched' to train: pass --train all")
    record = plan_quantization(student, precision)
    modules = dict(student.named_modules())
    wrapped = []
    try:
        for name, module in modules.items():
            if isinstance(module, torch.nn.Linear):
                parametrize.register_parametrization(module, "weight", FakeQuantizer(*record.spec(name)))
                wrapped.append(module)
        head = student.get_output_embeddings()
        if record.tied_embedding and head is not None:
            embedding = student.get_input_embeddings()
            spec = record.spec(next(n for n, m in modules.items() if m is head))
            parametrize.register_parametrization(embedding, "weight", FakeQuantizer(*spec))
            wrapped.append(embedding)
        log.info("quantization-aware: %d weights read through the %s fake quantizer, %d Linears of them 8-bit",
                 len(wrapped), record.precision, len(record.int8) if record.bits == 4 else len(wrapped))
        yield record
        set_record(student, record)
    finally:
        for module in wrapped:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
