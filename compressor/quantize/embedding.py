"""The token embedding table as GatherBlockQuantized, shared with a tied output projection.

A tied model reads one [vocab, hidden] table twice: the embedding Gather (through a Transpose, in
the builder's graphs) and the lm_head MatMul. Left float, that table is the largest tensor of a
small model (SmolLM2: 28M of its 135M parameters, 113 MB in fp32). ONNX Runtime's
GatherBlockQuantized gathers rows straight from MatMulNBits' packed weight ([vocab, blocks, bytes]
is one row per output column), so the quantized head serves as the embedding too, with no second
copy: the layout onnxruntime-genai's builder writes with `shared_embeddings`. Its zero points must
be integers (GatherBlockQuantized has no float zero points), so a head on the "minmax" grid is not
shared; an untied table gets its own quantization.
"""

from __future__ import annotations

import numpy as np

from compressor.quantize import blockwise


def tied_gathers(graph, weight_names: set[str]) -> dict[str, tuple[object, object]]:
    """{MatMul weight name: (Transpose node, Gather node)} for each embedding Gather that reads a
    MatMul weight through Transpose(perm=[1, 0]) and reads nothing else of it."""
    from onnx import helper

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    out = {}
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in weight_names:
            continue
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
        users = readers.get(node.output[0], [])
        if list(perm or []) == [1, 0] and len(users) == 1 and _plain_gather(users[0], node.output[0]):
            out[node.input[0]] = (node, users[0])
    return out


def own_gathers(graph, inits: dict) -> dict[str, object]:
    """{initializer name: Gather node} for Gathers of a 2-D float table on axis 0 that is read by
    no other node (an untied embedding)."""
    from onnx import TensorProto

    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    out = {}
    for node in graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if (t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT and uses[t.name] == 1
                and _plain_gather(node, t.name)):
            out[t.name] = node
    return out


def _plain_gather(node, data: str) -> bool:
    from onnx import helper

    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] == data and axis == 0


def shareable(q: blockwise.BlockQuant) -> bool:
    """Whether GatherBlockQuantized can read this quantization (integer or implicit zero points)."""
    return q.zero_points is None or q.zero_points.dtype == np.uint8


def gather_nodes(gather, q: blockwise.BlockQuant, names: list[str], hidden: int, graph) -> list:
    """Nodes that replace `gather`: Reshape of the packed weight `names[0]` ([vocab, blocks, bytes]
    -> [vocab, blocks * bytes]), GatherBlockQuantized with scales (and zero points) `names[1:]`,
    and a Slice when the rows were padded to whole blocks. Constants go into graph.initializer."""
    from onnx import helper, numpy_helper

    vocab, blocks = q.scales.shape
    width = blocks * q.block_size * q.bits // 8
    base = gather.name or gather.output[0]
    shape = numpy_helper.from_array(np.array([vocab, width], np.int64), f"{base}/quantized_shape")
    graph.initializer.append(shape)
    flat = f"{base}/quantized_rows"
    padded = blocks * q.block_size != hidden
    out = f"{base}/padded" if padded else gather.output[0]
    nodes = [
        helper.make_node("Reshape", [names[0], shape.name], [flat], name=f"{base}/Reshape"),
        helper.make_node("GatherBlockQuantized", [flat, gather.input[1], *names[1:]], [out],
                         name=f"{base}_Q{q.bits}", domain="com.microsoft", bits=q.bits, block_size=q.block_size,
                         gather_axis=0, quantize_axis=1),
    ]
    if padded:
        ends = [numpy_helper.from_array(np.array([v], np.int64), f"{base}/slice_{k}")
                for k, v in (("starts", 0), ("ends", hidden), ("axes", -1))]
        graph.initializer.extend(ends)
        nodes.append(helper.make_node("Slice", [out, *(t.name for t in ends)], [gather.output[0]], name=f"{base}/Slice"))
    return nodes
