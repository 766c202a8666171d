"""The `compress` command: mounts one plain function per subcommand, turns errors into one line."""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.markup import escape

from compressor.cli.common import err, rich_tracker, setup_logging

app = typer.Typer(
    name="compress",
    help="Make transformer language models shallower, and ship them to ONNX Runtime and TensorRT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# (module in compressor.cli, function, command name). Each module holds one plain function.
COMMANDS = [
    ("model", "model", "model"),
    ("info", "info", "info"),
    ("calibrate", "calibrate", "calibrate"),
    ("plan", "plan", "plan"),
    ("prune", "prune", "prune"),
    ("linearize", "linearize", "linearize"),
    ("heal", "heal", "heal"),
    ("export", "export", "export"),
    ("bench", "bench", "bench"),
    ("compare", "compare", "compare"),
    ("report", "report", "report"),
]


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    setup_logging(verbose)


def _mount() -> None:
    for module, func, name in COMMANDS:
        mod = importlib.import_module(f"compressor.cli.{module}")
        app.command(name=name)(getattr(mod, func))


_mount()


def main() -> None:
    from compressor.errors import CompressorError
    from compressor.progress import use_tracker

    try:
        with use_tracker(rich_tracker):  # stage messages arrive through logging
            app()
    except CompressorError as exc:
        if os.environ.get("COMPRESSOR_DEBUG"):
            raise
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/bold red]: nothing was written")
        sys.exit(130)
