"""What to quantize and how (QuantConfig), and what was done (QuantSummary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from compressor.errors import CompressorError

ALGORITHMS = ("rtn", "mse", "gptq")
KEEP_INT8 = ("none", "lm_head", "auto")
GRIDS = ("symmetric", "asymmetric", "minmax")
EMBEDDINGS = ("auto", "float")
# Measured on SmolLM2-135M (compressor.quantize's docstring): GPTQ (outlier tokens clipped) beat the
# activation-weighted range search on ORT's fast integer-zero-point grid.
AUTO_ALGORITHM = "gptq"
# Measured on SmolLM2-135M (compressor.quantize's docstring): bits -> grid
AUTO_GRID = {4: "asymmetric", 8: "symmetric"}


class QuantConfigError(CompressorError):
    """A quantization setting that cannot be honoured."""


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only MatMulNBits quantization of every MatMul with a constant 2-D weight.

    bits: 4 or 8. block_size: weights per scale along the input dimension (a power of two >= 16).
    grid: "symmetric" (no zero points, ORT's default), "asymmetric" (ORT's: the range including 0,
        integer zero points), "minmax" (each block's own range, float zero points: llama.cpp's Q4_1),
        or "auto": asymmetric for 4-bit MatMuls, symmetric for 8-bit ones (measured, compressor.quantize;
        minmax reproduces Q4_1 checkpoints exactly but ORT's CPU kernel has no fast path for float
        zero points: one 576x1536 MatMul decoded 30x slower).
    accuracy_level: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
    algorithm: "rtn" (round to nearest), "mse" (per-block clipping chosen by activation-weighted
        error), "gptq" (error feedback through the input Hessian); "mse" and "gptq" need calibration
        windows; "auto" is the measured default (see compressor.quantize) given calibration, else rtn.
    keep_int8: in a 4-bit model, which MatMuls stay 8-bit: "none", "lm_head" (the output
        projection), "auto" (the lm_head and, by measured sensitivity, the MatMuls holding up to
        int8_fraction of the other weights: compressor.quantize.mixed), or a comma-separated list of
        node names (exact ONNX node names).
    int8_fraction: the share of the 4-bit weights that keep_int8="auto" may move to 8 bits. 0.17 fits
        SmolLM2's int4 folder in 112 MB (measured, compressor.quantize: 111.7 MB, +0.2 points of
        perplexity against 0.25's 115.3 MB).
    int8_block_size: block size of the MatMuls kept 8-bit in a 4-bit model (and of an embedding
        table that shares one); None: block_size. 64 (measured, compressor.quantize): 1.8 MB less
        than 32 on SmolLM2 for +0.04 points of perplexity.
    act_order: GPTQ quantizes the input rows by decreasing calibrated energy (Hessian diagonal)
        instead of in order, each block's grid fixed beforehand from its original weights
        (compressor.quantize.blockwise.gptq_many); the export layout is the same. On by default
        (measured, compressor.quantize: SmolLM2 int4 +5.6% against +7.8% perplexity).
    damp: GPTQ's dampening, the fraction of the mean Hessian diagonal added to the diagonal (0.03:
        measured on SmolLM2 against 0.01 and 0.1, compressor.quantize).
    awq: with GPTQ, fold activation-aware per-input-channel scales into the norm or MatMul that
        writes each MatMul's input (compressor.quantize.awq; free at run time), after the 8-bit
        choice and before GPTQ. On by default (measured, compressor.quantize: SmolLM2 int4 +4.8% /
        +5.3% against +5.8% / +5.5% perplexity, bundled / wiki calibration, same size).
    embeddings: "auto" quantizes the token embedding table (GatherBlockQuantized; a tied table shares
        the output projection's quantized weight, 8-bit when that is), "float" keeps it as it is.
    """

    bits: int = 4
    block_size: int = 32
    grid: str = "auto"
    accuracy_level: int = 4
    algorithm: str = "auto"
    keep_int8: str = "auto"
    embeddings: str = "auto"
    int8_block_size: int | None = 64
    int8_fraction: float = 0.17
    act_order: bool = True
    damp: float = 0.03
    awq: bool = True

    def problems(self) -> list[str]:
        """Every reason this config cannot be used, each with what to do instead."""
        out = []
        if self.bits not in (4, 8):
            out.append(f"bits must be 4 or 8, not {self.bits}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            out.append(f"block_size must be a power of two >= 16 (e.g. 32), not {bs}")
        b8 = self.int8_block_size
        if b8 is not None and (not isinstance(b8, int) or b8 < 16 or b8 & (b8 - 1)):
            out.append(f"int8_block_size must be a power of two >= 16 (e.g. 64), or None, not {b8}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            out.append(f"accuracy_level must be 0-4 (4 = int8 compute, fastest on CPU), not {self.accuracy_level}")
        if self.algorithm not in (*ALGORITHMS, "auto"):
            out.append(f"algorithm must be one of {', '.join((*ALGORITHMS, 'auto'))}, not {self.algorithm!r}")
        if not 0 <= self.int8_fraction <= 1:
            out.append(f"int8_fraction must lie in [0, 1] (e.g. 0.17), not {self.int8_fraction}")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 10):
            out.append(f"damp must be a fraction of the mean Hessian diagonal in (0, 10] (e.g. 0.01), not {self.damp}")
        if not isinstance(self.awq, bool):
            out.append(f"awq must be True or False, not {self.awq!r}")
        if not isinstance(self.act_order, bool):
            out.append(f"act_order must be True or False, not {self.act_order!r}")
        if self.grid not in (*GRIDS, "auto"):
            out.append(f"grid must be one of {', '.join((*GRIDS, 'auto'))}, not {self.grid!r}")
        if self.embeddings not in EMBEDDINGS:
            out.append(f"embeddings must be one of {', '.join(EMBEDDINGS)}, not {self.embeddings!r}")
        if not isinstance(self.keep_int8, str) or not self.keep_int8.strip():
            out.append(f"keep_int8 must be one of {', '.join(KEEP_INT8)} or a list of node names")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise QuantConfigError("bad quantization config: " + "; ".join(problems))

    def resolved_algorithm(self, have_calibration: bool) -> str:
        if self.algorithm == "auto":  # 8-bit round to nearest is already within 1% (measured)
            return AUTO_ALGORITHM if have_calibration and self.bits == 4 else "rtn"
        if self.algorithm in ("gptq", "mse") and not have_calibration:
            raise QuantConfigError(
                f"algorithm {self.algorithm!r} needs calibration windows: pass calibration=token windows, or use 'rtn'"
            )
        return self.algorithm

    def block_for(self, bits: int) -> int:
        """Block size of a MatMul quantized to `bits`."""
        if bits == 8 and self.bits == 4 and self.int8_block_size:
            return self.int8_block_size
        return self.block_size

    def resolved_grid(self, bits: int) -> str:
        if self.grid != "auto":
            return self.grid
        return AUTO_GRID[bits]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantSummary:
    """What quantize_onnx did: per-node bit widths, algorithm, sizes and time."""

    config: dict
    algorithm: str
    nodes: dict[str, int] = field(default_factory=dict)  # ONNX node name -> bits
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stayed float
    embeddings: dict[str, str] = field(default_factory=dict)  # Gather name -> what it reads now
    notes: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def int8_nodes(self) -> list[str]:
        return [n for n, b in self.nodes.items() if b == 8]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = {str(b): sum(1 for v in self.nodes.values() if v == b) for b in sorted(set(self.nodes.values()))}
        return d
