"""What to quantize and how (QuantConfig), and what was done (QuantSummary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from compressor.errors import CompressorError

ALGORITHMS = ("rtn", "mse", "gptq")
KEEP_INT8 = ("none", "lm_head", "auto")
# Measured on SmolLM2-135M (compressor.quantize's docstring): activation-weighted clipping beat GPTQ.
AUTO_ALGORITHM = "mse"


class QuantConfigError(CompressorError):
    """A quantization setting that cannot be honoured."""


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only MatMulNBits quantization of every MatMul with a constant 2-D weight.

    bits: 4 or 8. block_size: weights per scale along the input dimension (a power of two >= 16).
    symmetric: no zero points (the grid ORT's builder uses by default).
    accuracy_level: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
    algorithm: "rtn" (round to nearest), "mse" (per-block clipping chosen by activation-weighted
        error), "gptq" (error feedback through the input Hessian); "mse" and "gptq" need calibration
        windows; "auto" is the measured default (see compressor.quantize) given calibration, else rtn.
    keep_int8: in a 4-bit model, which MatMuls stay 8-bit: "none", "lm_head" (the output
        projection), "auto" (the measured default, see compressor.quantize), or a comma-separated
        list of node names (exact ONNX node names).
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    algorithm: str = "auto"
    keep_int8: str = "auto"

    def problems(self) -> list[str]:
        """Every reason this config cannot be used, each with what to do instead."""
        out = []
        if self.bits not in (4, 8):
            out.append(f"bits must be 4 or 8, not {self.bits}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            out.append(f"block_size must be a power of two >= 16 (e.g. 32), not {bs}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            out.append(f"accuracy_level must be 0-4 (4 = int8 compute, fastest on CPU), not {self.accuracy_level}")
        if self.algorithm not in (*ALGORITHMS, "auto"):
            out.append(f"algorithm must be one of {', '.join((*ALGORITHMS, 'auto'))}, not {self.algorithm!r}")
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantSummary:
    """What quantize_onnx did: per-node bit widths, algorithm, sizes and time."""

    config: dict
    algorithm: str
    nodes: dict[str, int] = field(default_factory=dict)  # ONNX node name -> bits
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stayed float
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
