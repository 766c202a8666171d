"""The `compress` command: mounts one plain function per subcommand, turns errors into one line."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

import typer
from rich.markup import escape

from compressor.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    err,
    interrupt_note,
    interrupted_message,
    rich_tracker,
    setup_logging,
)

app = typer.Typer(
    name="compress",
    help="Make transformer language models shallower, and ship them to ONNX Runtime and TensorRT.\n\n"
    + EXIT_CODES_HELP,
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


def _say_interrupted() -> None:
    err.print(f"[bold red]interrupted[/bold red]: {escape(interrupted_message())}", highlight=False, soft_wrap=True)


def _interruptible(func):
    """The command, with Ctrl-C answered here: inside a command click would print "Aborted!" and exit 1,
    the code for a missed target."""

    @functools.wraps(func)
    def command(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            _say_interrupted()
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return command


def _mount() -> None:
    for module, func, name in COMMANDS:
        mod = importlib.import_module(f"compressor.cli.{module}")
        app.command(name=name)(_interruptible(getattr(mod, func)))


_mount()


def main() -> None:
    """Run a command; library errors become one line and exit 2, anything unexpected one line and exit 3."""
    from compressor.errors import CompressorError, first_line
    from compressor.util.progress import use_tracker

    debug = bool(os.environ.get("COMPRESSOR_DEBUG"))
    interrupt_note("nothing was written")  # until a command says otherwise
    # SIGTERM (a container stop, a job scheduler's kill) ends the run the way Ctrl-C does: the work is
    # kept and the message says where.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with use_tracker(rich_tracker):  # stage messages arrive through logging
            app()
    except CompressorError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug, not the user's doing: say so in one line, not with a traceback
        if debug:
            raise
        err.print(f"[bold red]internal error:[/bold red] {escape(type(exc).__name__)}: {escape(first_line(exc))} "
                  "(set COMPRESSOR_DEBUG=1 to see the traceback)", highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt

