"""Writing results atomically: a temporary sibling directory renamed into place at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from compressor.errors import CompressorError, OutputExistsError

log = logging.getLogger(__name__)


def check_output(out: Path | str, overwrite: bool) -> Path:
    """Refuse an existing output unless overwriting, and an output that cannot be created (its nearest
    existing ancestor is not a writable folder), before any work is spent on it. Returns the path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: pass --overwrite to replace it")
    ancestor = out.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise CompressorError(f"cannot write {out}: {ancestor} is not a writable folder; choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path | str, overwrite: bool = False):
    """Yield a temporary directory that replaces `out` only if the block finishes without error."""
    out = check_output(out, overwrite)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: the delivered folder follows the umask
    except OSError as exc:
        raise CompressorError(f"cannot write to {parent} ({exc.strerror}): choose another --out") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(path: Path | str):
    """Yield a temporary sibling path that replaces `path` only if the block finishes without error.

    Readers never see a half-written file, and an interrupted write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it 0600: the delivered file follows the umask
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # again: a writer that replaces the file (safetensors) makes it 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path | str, data) -> None:
    """Write `data` as indented JSON, atomically (dataclasses, arrays and paths included)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir(*parts: str) -> Path:
    """compressor's cache (COMPRESSOR_CACHE, else ~/.cache/compressor)."""
    root = Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def optional_cache_dir(*parts: str) -> Path | None:
    """`cache_dir(*parts)`, or None (with a warning) where it cannot be made, a read-only home say: a cache is
    not worth failing a run for."""
    try:
        return cache_dir(*parts)
    except OSError as exc:
        log.warning("working without compressor's cache (%s)", exc)
        return None


def dir_size(path: Path | str) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
