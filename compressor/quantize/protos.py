"""Reading, writing and running ONNX graphs of any size.

protobuf cannot serialize a message of 2 GiB or more ("EncodeError: Failed to serialize proto"),
and an fp32 graph of a 0.5B-parameter model is already 2.35 GB. So nothing here serializes a graph
in memory once it is over `PROTOBUF_LIMIT`: it is written to a folder with its weights as external
data and ONNX Runtime opens it by path. The limit is a module constant so that tests can lower it
and take the external-data path on a tiny graph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import CompressorError, require

log = logging.getLogger(__name__)

# Largest message protobuf serializes (2 GiB - 1 byte); a test lowers it to force the file path.
PROTOBUF_LIMIT = 2**31 - 1


def fits_in_memory(model) -> bool:
    """Whether `model` (a ModelProto, weights loaded) can be serialized in one piece."""
    from google.protobuf.message import EncodeError

    try:
        size = model.ByteSize()  # over 2 GiB, even measuring fails
    except EncodeError:
        return False
    return size < PROTOBUF_LIMIT


def load_model(src: Path):
    """The ModelProto of `src` with its weights (external data included) loaded."""
    onnx = require("onnx", "onnx", "quantizing ONNX graphs")
    src = Path(src)
    if not src.is_file():
        raise CompressorError(f"{src} is not an ONNX file: pass the model.onnx of an fp32 export")
    try:
        return onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 (onnx raises DecodeError / ValidationError / OSError here)
        raise CompressorError(f"cannot read {src} as ONNX ({exc}): export it again") from None


def save_model(model, dst: Path) -> None:
    """Write dst (+ dst.data with every weight of 1 KiB or more) so that readers never see half a
    model. External data whatever the size: the graph proto itself stays small."""
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    data = dst.name + ".data"
    try:
        onnx.save(model, str(tmp / dst.name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data, size_threshold=1024)
        mode = 0o666 & ~_umask()  # what a plain open() would give, not the temporary folder's 0600
        if (tmp / data).exists():
            os.chmod(tmp / data, mode)
            os.replace(tmp / data, dst.parent / data)
        os.chmod(tmp / dst.name, mode)
        os.replace(tmp / dst.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def ort_session(model, options=None):
    """An ONNX Runtime CPU session of a ModelProto, for the duration of the block.

    Under protobuf's limit the proto is handed over in memory; over it, it is saved to a temporary
    folder with external data (save_model) and opened by path, and the folder goes when the block
    ends. `model` is not changed (the external-data conversion works on a copy).
    """
    import onnx
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    if fits_in_memory(model):
        yield ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return
    tmp = Path(tempfile.mkdtemp(prefix="compressor-graph-"))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        save_model(copy, tmp / "model.onnx")
        del copy
        log.info("graph over protobuf's %d-byte limit: ONNX Runtime reads it from external data in %s",
                 PROTOBUF_LIMIT, tmp)
        yield ort.InferenceSession(str(tmp / "model.onnx"), options, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
