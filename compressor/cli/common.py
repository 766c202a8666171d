"""Shared CLI pieces: options defined once, console output, errors as one line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from compressor.errors import CompressorError

err = Console(stderr=True)
out = Console()

ModelArg = Annotated[str, typer.Argument(help="Model directory, .gguf file, or 'smollm2-135m' (packaged).")]
OptModelArg = Annotated[str, typer.Argument(help="Model directory, .gguf file, or 'smollm2-135m' (packaged).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (accelerate device_map).")]
DataOpt = Annotated[
    Path | None, typer.Option("--data", help=".txt, .jsonl or a directory of .txt (default: bundled text).")
]
FieldOpt = Annotated[str, typer.Option("--field", help="JSONL field that holds the text.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled (.bin) weights.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for window selection and sampling.")]

DEFAULT = "smollm2-135m"  # compressor.loading.DEFAULT_MODEL, without importing torch for --help

# Exit codes of every command (README "Exit codes"; `compress --help`).
EXIT_OK = 0            # done (for `model`: the target was met)
EXIT_MISSED = 1        # `model` finished but missed its target
EXIT_BAD_INPUT = 2     # a CompressorError: bad input, a missing extra, an unreachable target
EXIT_INTERNAL = 3      # an unexpected exception: a bug (COMPRESSOR_DEBUG=1 shows the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_CODES_HELP = ("Exit codes: 0 done (model: target met), 1 finished but missed the target, 2 bad input, "
                   "3 internal error (set COMPRESSOR_DEBUG=1 for the traceback), 130 interrupted (Ctrl-C or SIGTERM).")

_interrupt_note = ["nothing was written"]


def interrupt_note(text: str) -> None:
    """What Ctrl-C leaves behind, said by main() if the command is interrupted (default: nothing)."""
    _interrupt_note[0] = text


def interrupted_message() -> str:
    return _interrupt_note[0]


_FRACTION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*")


def parse_fraction(text: str, option: str) -> float:
    """A percentage ("10%") or a fraction ("0.1") as a fraction: the one reading of every such option.
    A bare number of 1 or more is refused: "10" could mean 10 % or +1000 %."""
    match = _FRACTION.fullmatch(text)
    if not match:
        raise CompressorError(f"cannot read {option} '{text}': write a percentage such as 10% or a fraction "
                              "such as 0.1")
    value = float(match.group(1))
    if match.group(2):
        return value / 100
    if value >= 1:
        raise CompressorError(f"{option} {text.strip()} is ambiguous: write {text.strip()}% or {value / 100:g}")
    return value


def parse_fractions(text: str, option: str) -> tuple[float, ...]:
    """A comma-separated list of percentages or fractions (see parse_fraction)."""
    return tuple(parse_fraction(part, option) for part in text.split(","))


def device_kwargs(device: str) -> dict:
    """--device auto means an accelerate device_map; anything else is a plain .to(device)."""
    if device == "auto":
        return {"device": None, "device_map": "auto"}
    return {"device": device}


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def rich_tracker(items, total, description):
    """A progress bar on stderr for compressor.util.progress.track."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=err, transient=True,
    ) as bar:
        task = bar.add_task(description or "working", total=total, info="")
        for item in items:
            yield item
            bar.advance(task)


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("compressor").setLevel(level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def distributed() -> bool:
    """Launched by torchrun (or accelerate launch) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str):
    """Under torchrun (WORLD_SIZE > 1), join the process group for the command: yields (rank, device),
    with `--device cuda` meaning this rank's GPU (cuda:LOCAL_RANK; NCCL), anything else gloo.
    Alone, (0, device) and nothing else happens."""
    import torch
    import torch.distributed as dist

    if not distributed():
        yield 0, device
        return
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    joined = not dist.is_initialized()
    if joined:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), device
    finally:
        if joined:
            dist.destroy_process_group()
