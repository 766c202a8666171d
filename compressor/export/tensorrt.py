"""TensorRT engines built from the exported ONNX graph, and a runner with the OrtCausalLM interface.

The network is strongly typed (TensorRT 10 opt-in, TensorRT 11 always): every tensor keeps the type
the ONNX graph gives it, so an fp16 export makes an fp16 engine and an fp32 export an fp32 one
(TF32 is switched off for fp32 engines unless asked for, so they validate at fp32 tolerance).
One optimization profile covers prefill and decode: batch, new tokens and past tokens each get
min/opt/max; the attention mask spans past + new tokens.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError, MissingDependencyError, require
from compressor.export.runtime import CausalRunner, load_config
from compressor.util.io import file_sha256, write_json
from compressor.util.progress import status

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
SIDECAR_SUFFIX = ".json"
INSTALL_NOTES = "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html"


def require_tensorrt(purpose: str = "building TensorRT engines"):
    """The tensorrt module, or a MissingDependencyError naming the extra and NVIDIA's install notes."""
    try:
        return require("tensorrt", "tensorrt", purpose)
    except MissingDependencyError as exc:
        exc.args = (f"{exc} (it also needs an NVIDIA GPU and driver; NVIDIA's install notes: {INSTALL_NOTES})",)
        raise


def require_cuda(purpose: str = "TensorRT") -> None:
    import torch

    if not torch.cuda.is_available():
        raise CompressorError(
            f"{purpose} needs an NVIDIA GPU with CUDA, and PyTorch sees none "
            "(torch.cuda.is_available() is False): run on a GPU machine with a CUDA build of torch"
        )


@dataclass
class TrtProfile:
    """min/opt/max of batch, new tokens per call (seq) and cached tokens (past)."""

    batch: tuple[int, int, int] = (1, 1, 8)
    seq: tuple[int, int, int] = (1, 128, 512)
    past: tuple[int, int, int] = (0, 256, 1024)

    def __post_init__(self):
        problems = []
        for name, low in (("batch", 1), ("seq", 1), ("past", 0)):
            value = tuple(int(v) for v in getattr(self, name))
            setattr(self, name, value)
            if len(value) != 3 or not low <= value[0] <= value[1] <= value[2]:
                problems.append(f"{name} {':'.join(map(str, value))} (need {low} <= min <= opt <= max)")
        if problems:
            raise CompressorError(f"invalid TensorRT profile: {'; '.join(problems)}")

    @classmethod
    def parse(cls, batch: str | None = None, seq: str | None = None, past: str | None = None) -> TrtProfile:
        """From "MIN:OPT:MAX" strings (None keeps the default)."""
        kwargs = {}
        for name, text in (("batch", batch), ("seq", seq), ("past", past)):
            if text is None:
                continue
            try:
                kwargs[name] = tuple(int(v) for v in text.split(":"))
            except ValueError:
                raise CompressorError(f"cannot read --trt-{name} '{text}': write MIN:OPT:MAX, e.g. 1:1:8") from None
        return cls(**kwargs)

    def accepts(self, batch: int, seq: int, past: int) -> bool:
        return (self.batch[0] <= batch <= self.batch[2] and self.seq[0] <= seq <= self.seq[2]
                and self.past[0] <= past <= self.past[2])

    def shapes(self, name: str, static: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of one graph input."""
        if name in ("input_ids", "position_ids"):
            return tuple((self.batch[i], self.seq[i]) for i in range(3))
        if name == "attention_mask":
            return tuple((self.batch[i], self.past[i] + self.seq[i]) for i in range(3))
        if name.startswith("past_key_values."):
            heads, dim = static[1], static[3]
            return tuple((self.batch[i], heads, self.past[i], dim) for i in range(3))
        raise CompressorError(f"the ONNX graph has an input '{name}' that this engine builder does not know")


@dataclass
class EngineInfo:
    path: str
    onnx: str
    onnx_sha256: str
    profile: dict
    tensorrt: str
    gpu: str
    compute_capability: str
    dtype: str
    tf32: bool
    size_bytes: int
    seconds: float
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def build_engine(onnx_path: Path | str, engine_path: Path | str | None = None, profile: TrtProfile | None = None,
                 workspace_gb: float | None = None, tf32: bool = False) -> EngineInfo:
    """Build and save a TensorRT engine (plus a JSON sidecar) from an exported model.onnx."""
    trt = require_tensorrt()
    require_cuda("building a TensorRT engine")
    import torch

    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_name(ENGINE_FILE)
    profile = profile or TrtProfile()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    status(f"parsing {onnx_path.name} for TensorRT {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise CompressorError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        low, opt, high = profile.shapes(tensor.name, tuple(tensor.shape))
        opt_profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(opt_profile)

    status(f"building the TensorRT engine (batch {profile.batch}, seq {profile.seq}, past {profile.past})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressorError("TensorRT could not build the engine (see its messages above): "
                              "try a smaller profile (--trt-seq/--trt-past) or more --trt-workspace-gb")
    engine_path.write_bytes(bytes(serialized))
    past_dtype = next((t.dtype for t in inputs if t.name.startswith("past_key_values.")), None)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = EngineInfo(
        path=engine_path.name, onnx=onnx_path.name, onnx_sha256=file_sha256(onnx_path),
        profile=asdict(profile), tensorrt=trt.__version__, gpu=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        dtype="float16" if past_dtype == trt.DataType.HALF else "float32", tf32=tf32,
        size_bytes=engine_path.stat().st_size, seconds=round(time.perf_counter() - start, 2),
        inputs=[t.name for t in inputs], outputs=[network.get_output(i).name for i in range(network.num_outputs)],
    )
    write_json(engine_path.with_name(engine_path.name + SIDECAR_SUFFIX), asdict(info))
    log.info("built %s in %.0f s (%.1f MB)", engine_path, info.seconds, info.size_bytes / 1e6)
    return info


def resolve_engine(path: Path | str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ENGINE_FILE
    if not path.is_file():
        raise CompressorError(f"no TensorRT engine at {path}: build one with `compress export MODEL --format tensorrt`")
    return path


class TrtCausalLM(CausalRunner):
    """A TensorRT engine with the OrtCausalLM interface (runs on the current CUDA device).

    Inputs may be numpy arrays or torch tensors; the returned cache stays on the GPU as torch tensors.
    """

    def __init__(self, engine_path: Path | str):
        trt = require_tensorrt("running TensorRT engines")
        require_cuda("running a TensorRT engine")
        import torch

        self.path = resolve_engine(engine_path)
        self.config = load_config(self.path.parent)
        sidecar = self.path.with_name(self.path.name + SIDECAR_SUFFIX)
        self.info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise CompressorError(f"TensorRT cannot load {self.path}: it was built by another TensorRT version "
                                  "or for another GPU; rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._types = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._past = [n for n in self._inputs if n.startswith("past_key_values.")]
        self.num_layers = len(self._past) // 2
        self._past_shapes = [tuple(self.engine.get_tensor_shape(n))[1:] for n in self._past]
        self.dtype = np.float16 if self._types[self._past[0]] == torch.float16 else np.float32
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._dummy = torch.zeros(16, dtype=torch.float32, device=self.device)  # an address for empty tensors

    def accepts(self, batch: int, seq: int, past: int, padded: bool = False) -> bool:
        profile = self.info.get("profile")
        return TrtProfile(**profile).accepts(batch, seq, past) if profile else True

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, s[0], 0, s[2]), dtype=self.dtype) for s in self._past_shapes]

    def _run(self, input_ids, attention_mask, position_ids, past):
        import torch

        values = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        values.update(zip(self._past, past))
        keep = []  # device buffers stay referenced until the step has run
        for name in self._inputs:
            tensor = self._on_device(values[name], self._types[name])
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._types[name], device=self.device)
            self.context.set_tensor_address(name, self._address(outputs[name]))
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CompressorError("TensorRT failed to run the engine (shapes outside its profile?)")
        logits = outputs.pop("logits").float().cpu().numpy()  # waits for the stream
        return logits, [outputs[n] for n in self._outputs if n != "logits"]

    def _on_device(self, value, dtype):
        import torch

        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(device=self.device, dtype=dtype).contiguous()

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr()


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, torch_type in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    return table[dtype]


def modelopt_qdq(onnx_path: Path | str, precision: str) -> Path:
    """Q/DQ-annotate an fp32 graph for an int8 or fp8 TensorRT engine with NVIDIA ModelOpt's ONNX
    quantization (imported only here; `compress export` checks for it before any work). The
    annotated graph is written beside the source as model_qdq.onnx."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise CompressorError(f"{precision} TensorRT engines need NVIDIA ModelOpt (pip install nvidia-modelopt)") from exc
    src = Path(onnx_path)
    dst = src.with_name("model_qdq.onnx")
    status(f"adding {precision} Q/DQ nodes with NVIDIA ModelOpt")
    quantize(onnx_path=str(src), quantize_mode=precision, output_path=str(dst))
    return dst
