"""Errors meant for the user: each carries what went wrong and what to do about it.

The CLI turns any `CompressorError` into one line on stderr and exit code 2;
`COMPRESSOR_DEBUG=1` shows the traceback instead.
"""


class CompressorError(Exception):
    """Base class of every error compressor raises on purpose."""


class ModelLoadError(CompressorError):
    """The model could not be found, read or trusted."""


class UnsupportedArchitectureError(CompressorError):
    """The architecture has no row in the adapter table."""


class InvalidPlanError(CompressorError):
    """Block indices, spans or plans that cannot be applied to this model."""


class DataError(CompressorError):
    """Calibration or evaluation text that cannot be used."""


class OutputExistsError(CompressorError):
    """The output path exists and overwriting was not asked for."""


class MissingDependencyError(CompressorError):
    """An optional extra (onnx, tensorrt, peft, gguf) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{package} is needed{what} but is not installed: pip install 'compressor[{extra}]'"
        )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): long messages from
    other libraries (exporters, protobuf, transformers) become one readable line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional dependency lazily, or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
