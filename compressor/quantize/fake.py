"""Fake quantization in torch, bit for bit ONNX Runtime's round to nearest, and the record of a
quantization-aware training that tells the export which grid to use.

ONNX Runtime's block quantizer (MLAS `MlasQuantizeBlockwise`, what `blockwise.rtn` calls for the
"symmetric" and "asymmetric" grids) computes, per block of `block_size` input rows of one output column:

- symmetric: m = max if |max| > |min| else min (a tie takes min), scale = m / -2**(bits-1), zero point
  2**(bits-1);
- asymmetric: lo = min(min, 0), hi = max(max, 0), scale = (hi - lo) / (2**bits - 1), zero point
  roundf(-lo / scale) clamped to the codes (0 when scale is 0);
- code = clamp(roundf(w * (1 / scale) + zero point), 0, 2**bits - 1), with 1 / scale taken as 0 for a
  zero scale. roundf rounds half away from zero (torch.round rounds half to even).

`fake_quantize` returns (code - zero point) * scale for a [N, K] torch weight (a Linear's layout, the
transpose of the MatMul's), with a straight-through gradient: d fake / d w = identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from compressor.errors import CompressorError

PRECISIONS = {"int4": 4, "int8": 8}
# model.config attribute that carries the record into config.json (a plain dict, no custom code to load)
CONFIG_KEY = "compressor_quantization_aware"


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: to nearest, halves away from zero (x - trunc(x) is exact, so no double rounding)."""
    whole = torch.trunc(x)
    frac = x - whole
    return whole + torch.where(frac.abs() >= 0.5, torch.sign(frac), torch.zeros_like(frac))


def blocks_of(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] -> [N, n_blocks, block_size], K zero-padded to whole blocks (zeros change no grid: the
    asymmetric range includes 0 and the symmetric one is the largest magnitude)."""
    pad = (-weight.shape[1]) % block_size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(weight.shape[0], -1, block_size)


def ort_grid(blocks: torch.Tensor, bits: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per block (last dim), as float32 tensors, as ONNX Runtime computes them."""
    lo, hi = torch.aminmax(blocks, dim=-1)
    if grid == "symmetric":
        m = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = m / float(-(2 ** (bits - 1)))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    if grid != "asymmetric":
        raise CompressorError(f"quantization-aware training follows ONNX Runtime's symmetric or asymmetric grid, "
                              f"not {grid!r}: pass --grid asymmetric or symmetric (or auto)")
    top = float(2**bits - 1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / top
    zp = torch.where(scale != 0, 0.0 - lo / torch.where(scale != 0, scale, 1), lo)
    zp = torch.where(zp < 0, 0.0, torch.where(zp > top, top, round_half_away(zp)))
    return scale, zp


def ort_codes(blocks: torch.Tensor, bits: int, grid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, n_blocks, block_size], scale [N, n_blocks], zero point [N, n_blocks]), float32."""
    scale, zp = ort_grid(blocks, bits, grid)
    reciprocal = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1), 0.0)
    codes = round_half_away(blocks * reciprocal[..., None] + zp[..., None]).clamp(0, 2**bits - 1)
    return codes, scale, zp


class _RoundThrough(torch.autograd.Function):
    """The dequantized weight forward; the gradient passes through to the latent weight unchanged."""

    @staticmethod
    def forward(ctx, weight, bits, block_size, grid):
        with torch.no_grad():
            w = weight.float()
            codes, scale, zp = ort_codes(blocks_of(w, block_size), bits, grid)
            dq = ((codes - zp[..., None]) * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]
        return dq.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize(weight: torch.Tensor, bits: int, block_size: int, grid: str) -> torch.Tensor:
    """dequantize(quantize(weight)) of a [N, K] weight on ONNX Runtime's grid, straight-through."""
    return _RoundThrough.apply(weight, bits, block_size, grid)


class FakeQuantizer(torch.nn.Module):
    """A parametrization (torch.nn.utils.parametrize) that reads a weight through fake_quantize."""

    def __init__(self, bits: int, block_size: int, grid: str):
        super().__init__()
        self.bits, self.block_size, self.grid = bits, block_size, grid

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.block_size, self.grid)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, block_size={self.block_size}, grid={self.grid}"


@dataclass
class QuantAwareRecord:
    """What a quantization-aware training ran through, so the export writes the same integers.

    int8: the Linear modules (names in the model) trained at 8 bits; every other Linear at `bits`.
    tied_embedding: the input embedding shares the output projection's weight and was read through
    the same fake quantizer (the export's GatherBlockQuantized reads that quantized weight).
    """

    precision: str
    bits: int
    block_size: int
    grid: str
    int8_block_size: int
    int8_grid: str
    int8: list[str] = field(default_factory=list)
    tied_embedding: bool = False

    def bits_of(self, module: str) -> int:
        return 8 if module in self.int8 else self.bits

    def spec(self, module: str) -> tuple[int, int, str]:
        """(bits, block size, grid) of one Linear."""
        if self.bits_of(module) == 8 and self.bits == 4:
            return 8, self.int8_block_size, self.int8_grid
        return self.bits, self.block_size, self.grid

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantAwareRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def record_of(model) -> QuantAwareRecord | None:
    """The record a quantization-aware healing left in model.config, if any."""
    d = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return QuantAwareRecord.from_dict(d) if isinstance(d, dict) and d else None


def set_record(model, record: QuantAwareRecord | None) -> None:
    """Write (or with None, remove) the record in model.config; save_pretrained puts it in config.json."""
    if record is not None:
        setattr(model.config, CONFIG_KEY, record.to_dict())
    elif hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)


def linear_weights(model) -> dict[str, torch.Tensor]:
    """{module name: weight [N, K]} of every nn.Linear (what the export's weight MatMuls hold, transposed)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def onnx_sources(weights: dict, model) -> dict[str, list[str]]:
    """{MatMul node: [Linear module names]} for weight MatMuls whose [K, N] initializer is the Linear
    weights, transposed, side by side along N (the builder fuses q, k and v into one MatMul).
    `weights`: {node name: numpy [K, N]}. Nodes that match no run of Linear weights are left out."""
    import numpy as np

    linears = {n: w.detach().float().cpu().numpy() for n, w in linear_weights(model).items()}
    by_row: dict[bytes, list[str]] = {}
    for name, w in linears.items():
        by_row.setdefault(np.ascontiguousarray(w[0]).tobytes(), []).append(name)
    out = {}
    for node, wk in weights.items():
        wk = np.asarray(wk, dtype=np.float32)
        names, j = [], 0
        while j < wk.shape[1]:
            column = np.ascontiguousarray(wk[:, j]).tobytes()
            match = next((n for n in by_row.get(column, []) if j + linears[n].shape[0] <= wk.shape[1]
                          and np.array_equal(linears[n].T, wk[:, j: j + linears[n].shape[0]])), None)
            if match is None:
                break
            names.append(match)
            j += linears[match].shape[0]
        if names and j == wk.shape[1]:
            out[node] = names
    return out


def export_config(record: QuantAwareRecord, config, sources: dict[str, list[str]], candidates) -> tuple[object, list]:
    """The QuantConfig that writes the trained integers (round to nearest, the recorded grids, block
    sizes and 8-bit nodes) from `config`, and notes on what could not follow the record."""
    import dataclasses

    notes = []
    int8 = [node for node, names in sources.items() if any(record.bits_of(n) == 8 for n in names)]
    mixed = [node for node, names in sources.items() if len({record.bits_of(n) for n in names}) > 1]
    if mixed:
        notes.append(f"quantization-aware: {', '.join(mixed[:3])} fuse Linears trained at different bits; 8-bit")
    unmatched = [n for n in candidates if n not in sources]
    if unmatched:
        notes.append(f"quantization-aware: {len(unmatched)} MatMuls match no trained Linear "
                     f"({', '.join(unmatched[:3])}); they are quantized to nearest at {record.bits} bits")
    from compressor.quantize.config import AUTO_GRID

    if record.bits == 8 or record.grid == record.int8_grid:
        grid = record.grid
    elif (record.grid, record.int8_grid) == (AUTO_GRID[4], AUTO_GRID[8]):
        grid = "auto"
    else:
        raise CompressorError(f"the quantization-aware record pairs a {record.grid} 4-bit grid with a "
                              f"{record.int8_grid} 8-bit one, which one export cannot write: heal again")
    new = dataclasses.replace(config, bits=record.bits, algorithm="rtn", block_size=record.block_size, grid=grid,
                              int8_block_size=record.int8_block_size, keep_int8=",".join(int8) or "none")
    notes.append(f"quantization-aware: round to nearest on the trained grid, {len(int8)} MatMuls 8-bit as trained")
    return new, notes


def graph_weights(path) -> dict:
    """{MatMul node name: numpy [K, N]} of the weight MatMuls of the ONNX graph at `path`, named as
    quantize_onnx names them (an unnamed node i: MatMul_i)."""
    from pathlib import Path

    from onnx import TensorProto, numpy_helper

    from compressor.quantize.protos import load_model

    graph = load_model(Path(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for i, node in enumerate(graph.node):
        t = inits.get(node.input[1]) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
        if t is not None and len(t.dims) == 2 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            out[node.name or f"MatMul_{i}"] = numpy_helper.to_array(t)
    return out


def follow_training(model, onnx_path, config) -> tuple[object, list[str]]:
    """(QuantConfig, notes) for quantizing the float graph `onnx_path` exported from `model`: `config`
    unchanged, unless a quantization-aware healing of this precision left its record in model.config;
    then the one that writes the trained integers (export_config)."""
    record = record_of(model)
    if record is None:
        return config, []
    if record.bits != config.bits:
        note = f"quantization-aware healing trained for {record.precision}: a {config.bits}-bit export rounds as usual"
        return config, [note]
    weights = graph_weights(onnx_path)
    return export_config(record, config, onnx_sources(weights, model), weights)
