"""Progress reporting without printing from the library.

Library code wraps long loops in `track(...)`; by default that is a plain pass-through.
A front end (the CLI) installs a tracker with `use_tracker`, e.g. one that draws a rich
progress bar on stderr.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Tracker(Protocol):
    def __call__(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...


def _passthrough(items, total, description):
    yield from items


_tracker: contextvars.ContextVar[Tracker] = contextvars.ContextVar("compressor_tracker", default=_passthrough)
_status: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "compressor_status", default=None
)


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate `items`, reporting progress to whatever tracker is installed."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return iter(_tracker.get()(items, total, description))


def status(message: str) -> None:
    """Report a stage change (shown by the CLI; logged otherwise)."""
    import logging

    callback = _status.get()
    if callback is not None:
        callback(message)
    logging.getLogger("compressor").info(message)


@contextlib.contextmanager
def use_tracker(tracker: Tracker, on_status: Callable[[str], None] | None = None):
    token = _tracker.set(tracker)
    token2 = _status.set(on_status)
    try:
        yield
    finally:
        _tracker.reset(token)
        _status.reset(token2)
