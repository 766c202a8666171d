"""quantize_onnx: replace an fp32 graph's constant-weight MatMuls by MatMulNBits nodes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError
from compressor.quantize import awq, blockwise, embedding, mixed
from compressor.quantize.calibration import Hessians, input_hessians
from compressor.quantize.config import QuantConfig, QuantConfigError, QuantSummary
from compressor.quantize.protos import load_model, save_model
from compressor.util.progress import status, track

log = logging.getLogger(__name__)

# Ops that pass the logits through unchanged in meaning (bias, scaling, casts, reshapes): walking
# back over them from the "logits" output finds the output projection in any exporter's graph.
# GPTQ's Hessian counts a token at most at 4x the median token norm (calibration.clip_token_norms).
TOKEN_CLIP = 4.0
_PASS_THROUGH = {"Add", "Mul", "Div", "Cast", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze"}


def _weight_matmuls(graph) -> dict[str, object]:
    """MatMul nodes whose second input is a 2-D float initializer, by node name."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.initializer}
    out = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        t = inits.get(node.input[1])
        if t is not None and len(t.dims) == 2 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            if not node.name:
                node.name = f"MatMul_{i}"
            out[node.name] = node
    return out


def output_projection(graph, candidates: dict) -> str | None:
    """Name of the MatMul that produces the graph's logits (the lm_head), if there is one."""
    producer = {o: n for n in graph.node for o in n.output}
    outputs = [o.name for o in graph.output]
    name = "logits" if "logits" in outputs else (outputs[0] if outputs else None)
    seen = 0
    while name in producer and seen < 16:
        node = producer[name]
        if node.name in candidates and node.op_type == "MatMul":
            return node.name
        if node.op_type not in _PASS_THROUGH:
            return None
        name, seen = node.input[0], seen + 1
    return None


def plan_bits(config: QuantConfig, graph, candidates: dict) -> tuple[dict[str, int], list[str]]:
    """Bits per candidate MatMul under config.keep_int8, and notes on the choice."""
    bits = {name: config.bits for name in candidates}
    notes = []
    keep = config.keep_int8.strip()
    if config.bits == 8 or keep == "none":
        return bits, notes
    if keep in ("lm_head", "auto"):
        head = output_projection(graph, candidates)
        if head is None:
            notes.append("keep_int8: no MatMul produces the logits; every MatMul is 4-bit")
        else:
            bits[head] = 8
        return bits, notes
    names = [n.strip() for n in keep.split(",") if n.strip()]
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise QuantConfigError(
            f"keep_int8 names {', '.join(unknown[:3])} are not weight MatMuls of this graph; "
            f"use 'none', 'lm_head', 'auto' or names such as {next(iter(candidates), '?')}"
        )
    bits.update({n: 8 for n in names})
    return bits, notes


def _nbits_node(node, q: blockwise.BlockQuant, weight, config: QuantConfig, graph):
    """A MatMulNBits node (and its initializers, appended to graph) computing what `node` did."""
    from onnx import helper, numpy_helper

    packed, scales, zp = blockwise.pack(q)
    dtype = np.float16 if weight.dtype == np.float16 else np.float32
    base = node.input[1]
    names = [f"{base}_Q{q.bits}", f"{base}_scales"]
    graph.initializer.extend(
        [numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales.astype(dtype), names[1])]
    )
    if zp is not None:
        names.append(f"{base}_zero_points")
        zp = zp if zp.dtype == np.uint8 else zp.astype(dtype)  # float zero points share the scales' type
        graph.initializer.append(numpy_helper.from_array(zp, names[2]))
    k, n = weight.shape
    new = helper.make_node(
        "MatMulNBits",
        [node.input[0], *names],
        list(node.output),
        name=f"{node.name}_Q{q.bits}",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=q.bits,
        block_size=q.block_size,
        accuracy_level=config.accuracy_level,
    )
    return new, names, packed.nbytes + scales.nbytes + (zp.nbytes if zp is not None else 0)


def _quantize_all(candidates, weights, bits, hessians, config, algorithm) -> dict[str, blockwise.BlockQuant]:
    """Each MatMul's quantization: RTN one by one, GPTQ in batches.

    GPTQ treats output columns independently given the input Hessian, so MatMuls reading the same
    input (gate and up, or q, k and v) are concatenated along N and done as one, and same-shaped
    groups of all layers go through one batched loop.
    """
    out = {}
    groups: dict[tuple, list[str]] = {}
    for name, node in candidates.items():
        h = hessians.get(node.input[0])
        if h is not None and algorithm == "mse":
            out[name] = blockwise.rtn_search(weights[name], np.diagonal(h) if h.ndim == 2 else h, bits[name],
                                             config.block_for(bits[name]), config.resolved_grid(bits[name]))
        elif h is not None and h.ndim == 2:
            groups.setdefault((node.input[0], bits[name]), []).append(name)
        else:
            out[name] = blockwise.rtn(weights[name], bits[name], config.block_for(bits[name]),
                                      config.resolved_grid(bits[name]))
    batches: dict[tuple, list[tuple]] = {}
    for (inp, b), names in groups.items():
        w = np.concatenate([weights[n].astype(np.float32) for n in names], axis=1)
        batches.setdefault((w.shape, b), []).append((names, w, hessians[inp]))
    for (shape, b), items in track(list(batches.items()), description="GPTQ"):
        # Batches bounded in memory: a few copies of B x K x N float32 live during the loop.
        per = max(1, int(2**26 // (shape[0] * shape[1])))
        for i in range(0, len(items), per):
            chunk = items[i : i + per]
            qs = blockwise.gptq_many([c[1] for c in chunk], [c[2] for c in chunk], b, config.block_for(b),
                                     config.resolved_grid(b), damp=config.damp, act_order=config.act_order)
            for (names, _, _), q in zip(chunk, qs, strict=True):
                parts = blockwise.split(q, [weights[n].shape[1] for n in names])
                out.update(zip(names, parts, strict=True))
    return out


def _rewrite(model, candidates, weights, quants, config: QuantConfig, summary: QuantSummary) -> None:
    """Swap each candidate MatMul for its MatMulNBits node (and embedding Gathers for
    GatherBlockQuantized, see compressor.quantize.embedding), in place, and drop dead weights."""
    from onnx import helper

    graph = model.graph
    names_taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):  # nodes are replaced by name below: every one needs its own
        if not node.name:
            node.name = next(f"{node.op_type}_{i}{'_' * k}" for k in range(len(names_taken) + 1)
                             if f"{node.op_type}_{i}{'_' * k}" not in names_taken)
            names_taken.add(node.name)
    tied = embedding.tied_gathers(graph, {c.input[1] for c in candidates.values()}) if config.embeddings == "auto" else {}
    replaced: dict[str, list] = {}
    for name, node in candidates.items():
        new, names, size = _nbits_node(node, quants[name], weights[name], config, graph)
        replaced[name] = [new]
        summary.nodes[name] = quants[name].bits
        summary.bytes_before += weights[name].nbytes
        summary.bytes_after += size
        transpose, gather = tied.get(node.input[1], (None, None))
        if gather is None:
            continue
        if not embedding.shareable(quants[name]):
            summary.notes.append(f"embedding {gather.name} stays float: its tied {name} has float zero points")
            continue
        replaced[transpose.name] = []
        replaced[gather.name] = embedding.gather_nodes(gather, quants[name], names, weights[name].shape[0], graph)
        summary.embeddings[gather.name] = f"{quants[name].bits}-bit, the quantized weight of its tied {name}"
    if config.embeddings == "auto":
        _own_embeddings(graph, config, summary, replaced)
    new_nodes = [m for n in graph.node for m in replaced.get(n.name, [n])]
    del graph.node[:]
    graph.node.extend(new_nodes)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _own_embeddings(graph, config: QuantConfig, summary: QuantSummary, replaced: dict) -> None:
    """An untied embedding table: 8-bit on the symmetric grid with the range search (uniform weights)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    for table, gather in embedding.own_gathers(graph, inits).items():
        w = numpy_helper.to_array(inits[table])
        q = blockwise.rtn_search(w.T, None, 8, config.block_for(8), "symmetric")
        packed, scales, _ = blockwise.pack(q)
        names = [f"{table}_Q8", f"{table}_scales"]
        graph.initializer.extend([numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1])])
        replaced[gather.name] = embedding.gather_nodes(gather, q, names, w.shape[1], graph)
        summary.embeddings[gather.name] = "8-bit, its own table"
        summary.bytes_before += w.nbytes
        summary.bytes_after += packed.nbytes + scales.nbytes


def measure_hessians(src: Path, windows, skip_first: int = 0, full: bool = True,
                     clip_tokens: float | None = None) -> Hessians:
    """The input Hessians (full=False: their diagonals) of every weight MatMul of `src`, for one or
    more quantize_onnx calls (for "gptq", with clip_tokens=TOKEN_CLIP as quantize_onnx measures them)."""
    model = load_model(Path(src))
    inputs = sorted({node.input[0] for node in _weight_matmuls(model.graph).values()})
    return input_hessians(model, inputs, windows, skip_first=skip_first, full=full, clip_tokens=clip_tokens)


def quantize_onnx(src: Path, dst: Path, config: QuantConfig, calibration=None) -> QuantSummary:
    """Quantize the weights of every constant-weight MatMul in `src` to MatMulNBits and write `dst`.

    calibration: token windows (LongTensor [n, seq]) used by "mse", "gptq" and "auto" to weight
    each MatMul's rounding error by its real inputs, or `Hessians` measured before on the same
    graph (`measure_hessians`; full matrices for "gptq", diagonals suffice for "mse"). Embeddings (Gather) and other ops stay as they are.
    """
    from onnx import numpy_helper

    config.validate()
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CompressorError(f"quantize_onnx would overwrite its source {src}: choose another dst")
    algorithm = config.resolved_algorithm(calibration is not None)
    start = time.perf_counter()
    status(f"quantizing {src.name} ({config.bits}-bit {algorithm})")
    model = load_model(src)
    graph = model.graph
    candidates = _weight_matmuls(graph)
    if not candidates:
        raise CompressorError(f"{src} has no MatMul with a constant weight: nothing to quantize")
    bits, notes = plan_bits(config, graph, candidates)
    summary = QuantSummary(config=config.to_dict(), algorithm=algorithm, notes=notes)
    hessians = {}
    if algorithm in ("gptq", "mse"):
        t0 = time.perf_counter()
        if not isinstance(calibration, Hessians):
            inputs = sorted({node.input[0] for node in candidates.values()})
            gptq = algorithm == "gptq"
            calibration = input_hessians(model, inputs, calibration, full=gptq, clip_tokens=TOKEN_CLIP if gptq else None)
        hessians, summary.calibration_tokens = calibration.sums, calibration.tokens
        summary.calibration_seconds = time.perf_counter() - t0
    inits = {t.name: t for t in graph.initializer}
    weights = {name: numpy_helper.to_array(inits[node.input[1]]) for name, node in candidates.items()}
    quants = _quantize_all(candidates, weights, bits, hessians, config, algorithm)
    promoted = {}
    if config.bits == 4 and config.keep_int8.strip() == "auto" and config.int8_fraction > 0:
        promoted = mixed.most_sensitive(candidates, weights, quants, hessians, bits, config.int8_fraction)
        bits.update(dict.fromkeys(promoted, 8))
        summary.notes.append(f"keep_int8=auto: {len(promoted)} most sensitive MatMuls 8-bit (relative output error "
                             f"{min(promoted.values(), default=0):.2e} and up, {config.int8_fraction:.0%} of the weights)")
    if config.awq and config.bits == 4 and algorithm == "gptq":
        # After the choice of 8-bit MatMuls, which is made on the weights as they are: scaled first,
        # the unscaled ones would look worst and take the 8-bit budget (measured, compressor.quantize).
        hessians = dict(hessians)  # the caller's Hessians stay those of the graph it measured
        folded = awq.fold_scales_(graph, candidates, hessians, config.block_for(4), config.resolved_grid(4))
        summary.notes.append(f"awq: scales folded into the writers of {len(folded)} MatMul inputs "
                             f"(alpha {min(folded.values(), default=0):.2f}-{max(folded.values(), default=0):.2f})")
        scaled = {name: numpy_helper.to_array(inits[node.input[1]]) for name, node in candidates.items()}
        # Again only where the weights or the bits changed (the tied lm_head and o keep theirs).
        redo = {n: candidates[n] for n in candidates if n in promoted or not np.array_equal(scaled[n], weights[n])}
        weights = scaled
        quants.update(_quantize_all(redo, weights, bits, hessians, config, algorithm))
    elif promoted:
        quants.update(_quantize_all({n: candidates[n] for n in promoted}, weights, bits, hessians, config, algorithm))
    _rewrite(model, candidates, weights, quants, config, summary)
    save_model(model, dst)
    summary.seconds = time.perf_counter() - start
    log.info("quantized %d MatMuls (%s) in %.1f s", len(summary.nodes), algorithm, summary.seconds)
    return summary
