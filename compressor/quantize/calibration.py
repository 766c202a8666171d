"""Input statistics of a graph's MatMuls, measured by running the fp32 ONNX graph itself.

Working on the graph (not the torch model) means the statistics belong to exactly the nodes being
quantized, whatever exporter wrote them (the ORT builder fuses q/k/v into one MatMul, ours does
not): the input of each MatMul is added as a graph output and X^T X is summed over the
calibration tokens.

Outlier tokens: SmolLM2-like models put a hidden state 100x larger than the rest on the first
token of every window (../shared/FINDINGS.md). `skip_first` can leave the first positions of each
window out of the sums; the default counts them, deliberately: that token is the attention sink
every later token reads, and channels that are quiet elsewhere are huge on it. Left out, GPTQ dumps
rounding error into exactly those channels and breaks the sink (SmolLM2 int4 GPTQ: +65% perplexity
with the first token left out, +42% with it counted, 4k/2k test tokens). Counted at full weight it
dominates the sum instead: `clip_tokens` keeps it, at the weight of a few typical tokens
(tests/quantize/test_blockwise.py: on a synthetic layer with one 150x token per window, GPTQ's
held-out error on typical tokens went from 2.0x round-to-nearest's to 0.91x).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from compressor.errors import DataError
from compressor.quantize.protos import ort_session
from compressor.util.gram import Gram
from compressor.util.progress import track

log = logging.getLogger(__name__)


@dataclass
class Hessians:
    """X^T X (float64 [K, K], or its diagonal [K]) per MatMul input tensor name, and how many
    tokens were summed.

    Measured once, they can be handed to several quantize_onnx calls on the same graph."""

    sums: dict[str, np.ndarray]
    tokens: int


def clip_token_norms(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Rows of x [tokens, K] scaled down to at most `clip` times the median row norm."""
    norms = x.norm(dim=1)
    cap = clip * norms.median()
    return x * (cap / norms.clamp(min=float(cap) or 1.0))[:, None]


def head_size(graph) -> int | None:
    """The KV-cache head size of a builder-style graph, whose cache shape leaves it symbolic.

    Read from the first GroupQueryAttention: its query comes from a MatMul (or MatMulNBits) of width
    (num_heads + 2 * kv_num_heads) * head_size when q, k and v are packed, num_heads * head_size if not.
    """
    from onnx import helper

    producer = {o: n for n in graph.node for o in n.output}
    widths = {t.name: t.dims[-1] for t in graph.initializer if len(t.dims) == 2}
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        src = producer.get(node.input[0])
        while src is not None and src.op_type not in ("MatMul", "MatMulNBits") and src.input:
            src = producer.get(src.input[0])
        if src is None:
            return None
        if src.op_type == "MatMulNBits":
            width = next(a.i for a in src.attribute if a.name == "N")
        elif src.input[1] in widths:
            width = widths[src.input[1]]
        else:
            return None
        packed = len(node.input) < 2 or not node.input[1]
        heads = attrs["num_heads"] + (2 * attrs["kv_num_heads"] if packed else 0)
        return int(width // heads)
    return None


def _feeds(session, ids: np.ndarray, head: int | None = None) -> dict:
    """Inputs for one prefill with an empty KV cache, for Optimum- or builder-style graphs.

    The cache's sequence dim (third) is 0; a symbolic last dim is the head size `head`."""
    batch, seq = ids.shape
    feeds = {}
    for inp in session.get_inputs():
        name = inp.name
        if name == "input_ids":
            feeds[name] = ids.astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif name.startswith("past_key_values"):
            shape = [d if isinstance(d, int) else 0 for d in inp.shape]
            shape[0], shape[2] = batch, 0
            if not isinstance(inp.shape[3], int):
                shape[3] = head or 0
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[name] = np.zeros(shape, dtype=dtype)
        else:
            raise DataError(f"cannot calibrate a graph with input {name!r}: export a causal LM graph")
    return feeds


def input_hessians(model, inputs: list[str], windows, skip_first: int = 0, batch: int = 4,
                   full: bool = True, clip_tokens: float | None = None) -> Hessians:
    """X^T X (float64, [K, K]) of each tensor in `inputs` over the calibration windows; with
    full=False only its diagonal (sum of squares per input channel, [K]), which costs tokens x K
    instead of tokens x K^2.

    clip_tokens: a token whose input norm exceeds clip_tokens x the median token's (in its batch of
    windows) is scaled down to that norm first, so one massive-activation token weighs like a few
    typical ones instead of outweighing all of them (what GPTQ uses, see TOKEN_CLIP).

    model: an onnx.ModelProto (weights loaded); windows: LongTensor or array [n, seq].
    """
    import onnx

    ids = np.asarray(windows.cpu().numpy() if hasattr(windows, "cpu") else windows)
    if ids.ndim != 2 or ids.shape[1] <= skip_first:
        raise DataError(f"calibration windows must be [n, seq] with seq > {skip_first}, got {ids.shape}")
    outputs = len(model.graph.output)
    existing = {o.name for o in model.graph.output}
    try:  # the inputs become graph outputs for the probe session, and are removed again after
        for name in inputs:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        return _sums(model, inputs, ids, skip_first, batch, full, clip_tokens)
    finally:
        del model.graph.output[outputs:]


def _sums(probe, inputs, ids, skip_first, batch, full, clip_tokens) -> Hessians:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    head = head_size(probe.graph)
    grams: dict[str, Gram] = {}
    tokens = 0
    rows = list(range(0, ids.shape[0], batch))
    with ort_session(probe, opts) as session:  # over 2 GB, through external data
        for row in track(rows, description="calibrating"):
            chunk = ids[row : row + batch]
            outs = session.run(inputs, _feeds(session, chunk, head))
            for name, x in zip(inputs, outs, strict=True):
                # float32 products over a whole batch of windows (the cost: tokens x K^2 per input),
                # summed across batches in float64.
                x = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(chunk.shape[0], chunk.shape[1], -1))
                x = x[:, skip_first:].reshape(-1, x.shape[-1])
                if clip_tokens is not None:
                    x = clip_token_norms(x, clip_tokens)
                if name not in grams:
                    grams[name] = Gram(x.shape[1], diagonal=not full, product_dtype=torch.float32)
                grams[name].add(x)
            tokens += chunk.shape[0] * (ids.shape[1] - skip_first)
    sums = {name: g.xtx.numpy() for name, g in grams.items()}
    log.info("calibration: %d tokens through %d MatMul inputs", tokens, len(inputs))
    return Hessians(sums, tokens)
