"""Running an exported causal LM: ONNX Runtime here, TensorRT in `compressor.export.tensorrt`.

Both runners share one interface, which benchmarks and perplexity code against:
`.num_layers`, `.config`, `.empty_past(batch)`, `.forward(input_ids, attention_mask, position_ids, past)
-> (logits, present)` and `.generate_greedy(input_ids, max_new_tokens)`. Token arrays are numpy int64;
logits come back as numpy. The `present` items are whatever the runtime keeps its cache in (numpy on
CPU, device buffers on a GPU): pass them back as `past` unchanged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError, first_line, require

log = logging.getLogger(__name__)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def positions_from_mask(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids for the last `seq_len` tokens, counting only unmasked ones (as HF generate does)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    return np.ascontiguousarray(positions[:, -seq_len:])


def providers_for(device: str | None = None) -> list:
    """ONNX Runtime execution providers for a compressor device. cpu: the CPU only, even where
    onnxruntime-gpu could use a GPU; cuda or cuda:N: that GPU, then the CPU for what CUDA lacks;
    None or "auto": CUDA where this ONNX Runtime has it, else the CPU."""
    ort = require("onnxruntime", "onnx", "running ONNX models")
    available = ort.get_available_providers()
    if device in (None, "auto"):
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    match = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if not match:
        raise CompressorError(f"unknown device '{device}' for ONNX Runtime: use cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in available:
        raise CompressorError(f"--device {device} needs ONNX Runtime's CUDA provider, which this install lacks: "
                              "pip install onnxruntime-gpu, or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": int(match.group(1) or 0)}), "CPUExecutionProvider"]


def resolve_onnx(path: Path | str) -> Path:
    """An export folder (its optimised model if there is one, else model.onnx) or an .onnx file."""
    from compressor.export.onnx import ONNX_FILE, OPTIMIZED_FILE

    path = Path(path)
    if path.is_dir():
        for name in (OPTIMIZED_FILE, ONNX_FILE):
            if (path / name).is_file():
                return path / name
        raise CompressorError(f"{path} has no {ONNX_FILE}: export one with `compress export MODEL --out {path}`")
    if path.suffix == ".onnx" and path.is_file():
        return path
    raise CompressorError(f"{path} is neither an export folder nor an .onnx file")


def load_config(folder: Path):
    """The transformers config saved beside the graph, or None."""
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as exc:  # the graph runs without it
        log.warning("cannot read %s/config.json: %s", folder, exc)
        return None


def graph_ops(path: Path) -> set[str]:
    """The op types of an .onnx graph (its weights stay on disk)."""
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def _genai_decoder(folder: Path) -> dict:
    import json

    path = folder / "genai_config.json"
    return json.loads(path.read_text())["model"]["decoder"] if path.is_file() else {}


class CausalRunner:
    """What ONNX Runtime and TensorRT runners share: defaults for masks and positions, greedy decoding."""

    num_layers: int
    config = None

    def empty_past(self, batch: int) -> list:
        raise NotImplementedError

    def _run(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list]:
        raise NotImplementedError

    def past_length(self, past) -> int:
        return int(past[0].shape[2]) if past else 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None) -> tuple[np.ndarray, list]:
        """One step: logits [batch, seq, vocab] and the updated cache (past + these tokens)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        if attention_mask is None:
            attention_mask = np.ones((batch, self.past_length(past) + seq), dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        return self._run(input_ids, attention_mask, position_ids, past)

    def generate_greedy(self, input_ids, max_new_tokens: int, attention_mask=None,
                        eos_token_id: int | None = None) -> np.ndarray:
        """Prompt plus `max_new_tokens` greedy tokens, [batch, prompt + new]. Left padding via attention_mask.

        Without eos_token_id every row gets exactly max_new_tokens (no early stop).
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        tokens, past, step = ids, None, ids
        finished = np.zeros(ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            logits, past = self.forward(step, mask, None, past)
            nxt = logits[:, -1, :].argmax(axis=-1).astype(np.int64)
            if eos_token_id is not None:
                nxt = np.where(finished, eos_token_id, nxt)
                finished |= nxt == eos_token_id
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            step = nxt[:, None]
            if eos_token_id is not None and finished.all():
                break
        return tokens


class OrtCausalLM(CausalRunner):
    """An exported causal LM on ONNX Runtime.

    path: an export folder or an .onnx file. threads: intra-op threads (None: ONNX Runtime's default).
    providers: ONNX Runtime execution providers (`providers_for(device)` maps a device to them); by
    default CUDA where onnxruntime-gpu can use it, else CPU. On CUDA the cache stays on the GPU between
    steps (IO binding).
    spinning: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off here: when two
    sessions run in alternation (every side-by-side benchmark), one session's spinning threads take
    the cores from the other; on SmolLM2 decode with 2 threads that made p50 43 ms instead of 26.5 ms,
    and std 6 ms instead of 0.8 ms. A single-session server may turn it back on.
    """

    def __init__(self, path: Path | str, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = False):
        ort = require("onnxruntime", "onnx", "running ONNX models")
        self.path = resolve_onnx(path)
        self.config = load_config(self.path.parent)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if providers is None:
            providers = providers_for(None)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise CompressorError(f"ONNX Runtime cannot load {self.path}: {first_line(exc)}") from exc
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        cuda_options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
        self._device_id = int(cuda_options.get("device_id", 0))
        self._inputs = [i.name for i in self.session.get_inputs()]
        by_name = {i.name: i for i in self.session.get_inputs()}
        layers = sum(1 for n in by_name if n.startswith("past_key_values.")) // 2
        if not layers or "input_ids" not in by_name:
            raise CompressorError(f"{self.path} is not a causal LM with a KV cache (no past_key_values inputs)")
        # Matched by name, not by position: the builder's graphs list their outputs in another order.
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self._outputs = ["logits", *(f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))]
        missing = [n for n in self._past_names if n not in by_name]
        missing += sorted(set(self._outputs) - {o.name for o in self.session.get_outputs()})
        if missing:
            raise CompressorError(f"{self.path} lacks the cache inputs/outputs {', '.join(missing[:4])}")
        self.num_layers = layers
        past_inputs = [by_name[n] for n in self._past_names]
        head = _genai_decoder(self.path.parent).get("head_size", 0)
        # [batch, kv heads, past, head size]: the builder leaves the head size symbolic
        self._past_shapes = [(*(d if isinstance(d, int) else 0 for d in i.shape[1:3]),
                              i.shape[3] if isinstance(i.shape[3], int) else head) for i in past_inputs]
        self.dtype = _NUMPY_TYPES.get(past_inputs[0].type, np.float32)
        self.fused_attention = "GroupQueryAttention" in graph_ops(self.path)

    refusal_note = "ONNX Runtime's GroupQueryAttention runs batches without padding, and chunks after a past at batch 1"

    def accepts(self, batch: int, seq: int, past: int, padded: bool = False) -> bool:
        """Whether this graph computes these shapes. ONNX Runtime's GroupQueryAttention (in the
        builder's graphs) reads valid lengths from the mask as if sequences were right-aligned, so
        left padding is out, and it runs a chunk after a past only at batch 1; a graph with plain
        attention runs every shape."""
        if not self.fused_attention or batch == 1:
            return True
        return not padded and not (seq > 1 and past > 0)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, *shape), dtype=self.dtype) for shape in self._past_shapes]

    def past_length(self, past) -> int:
        if not past:
            return 0
        first = past[0]
        shape = first.shape() if callable(getattr(first, "shape", None)) else first.shape
        return int(shape[2])

    def _run(self, input_ids, attention_mask, position_ids, past):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed = {k: v for k, v in feed.items() if k in self._inputs}
        names = self._past_names
        if len(past) != len(names):
            raise CompressorError(f"expected {len(names)} past tensors ({self.num_layers} layers), got {len(past)}")
        if self.on_gpu:
            return self._run_bound(feed, dict(zip(names, past)))
        feed.update(zip(names, past))
        logits, *present = self.session.run(self._outputs, feed)
        return logits, present

    def _run_bound(self, feed: dict, past: dict):
        """CUDA: inputs and cache on the device, only the logits come back to the host."""
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.dtype))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cpu" if name == "logits" else "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present
