"""Calibration text: reading it (.txt, .jsonl, a directory of .txt, or the bundled default) and
cutting it into token windows.

The bundled default is general English: 80 Wikipedia articles (compressor/texts/README.md has the
source and the CC BY-SA attribution). The second bundled genre, Python's documentation, is the
"other source" a run is also scored on (`other_source`), so a report never rests on the calibration
text's own genre alone.

Windows are whole, disjoint slices of one token stream (documents joined by the tokenizer's EOS
token), so no window holds padding and padding never enters any statistic. The choice of windows
is a seeded permutation: the same text, tokenizer, sizes and seed give the same windows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from functools import cache
from pathlib import Path

import torch

from compressor.errors import DataError

log = logging.getLogger(__name__)

_HINT = "pass a .txt file, a .jsonl file, or a directory of .txt files"
ENGLISH = Path(__file__).parent / "texts" / "english.txt.gz"
DEFAULT_NAME = "bundled English"
DOCS_NAME = "Python documentation"


def load_texts(data: Path | str | None, field: str = "text") -> list[str]:
    """The documents in `data`; None gives the bundled general English (Wikipedia articles)."""
    if data is None:
        return list(english_texts())
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: {_HINT}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path} holds no .txt files: {_HINT}")
        texts = [_read_text(p) for p in files]
    elif path.suffix == ".jsonl":
        texts = _read_jsonl(path, field)
    else:
        texts = [_read_text(path)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path} holds no text: {_HINT}")
    return texts


@cache
def english_texts() -> tuple[str, ...]:
    """The bundled Wikipedia articles, one document each (split at their ` = Title = ` headings)."""
    text = gzip.decompress(ENGLISH.read_bytes()).decode("utf-8")
    return tuple(a.strip() for a in re.split(r"(?m)^(?= = [^=].*= *$)", text) if a.strip())


def other_source(data: Path | str | None) -> tuple[str, list[str]]:
    """(name, documents) of a bundled text of another source than `data`: Python's documentation for the
    bundled English, the bundled English for a text of the user's."""
    if data is None:
        return DOCS_NAME, python_docs_texts()
    return DEFAULT_NAME, list(english_texts())


def text_name(data: Path | str | None) -> str:
    return DEFAULT_NAME if data is None else Path(data).name


def python_docs_texts() -> list[str]:
    """Prose paragraphs of `pydoc_data.topics` (grammar, code samples and heading rules dropped)."""
    from pydoc_data.topics import topics

    texts = []
    for name in sorted(topics):
        paragraphs = []
        for para in topics[name].split("\n\n"):
            lines = para.strip("\n").splitlines()
            prose = lines and not lines[0][:1].isspace() and not any(_is_rule(line) for line in lines)
            if prose:
                paragraphs.append(" ".join(line.strip() for line in lines))
        if paragraphs:
            texts.append("\n\n".join(paragraphs))
    return texts


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and set(stripped) <= set("*=-~^")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty: {_HINT}")
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary, not text: {_HINT}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: {_HINT}") from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not JSON: each line must be one JSON object") from None
        if not isinstance(record, dict) or field not in record:
            found = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path} line {number} has no field '{field}' (found: {found}): pass --field NAME")
        if not isinstance(record[field], str):
            raise DataError(f"{path} line {number}: field '{field}' is not a string")
        texts.append(record[field])
    return texts


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one 1-D token tensor, documents separated by EOS (when the tokenizer has one).

    Each document is encoded in pieces of 65,536 characters, so a single huge file does not trip length
    warnings. A fast tokenizer's stream of a long text is kept in this process (keyed by the tokenizer's
    own definition and the texts' content): a run's stages and a test session's tests tokenize the
    bundled English once, not once each."""
    key = _stream_key(tokenizer, texts)
    stream = _STREAMS.get(key) if key else None
    if stream is None:
        stream = _tokenize(tokenizer, texts)
        if key:
            while len(_STREAMS) >= _KEEP:
                _STREAMS.pop(next(iter(_STREAMS)))
            _STREAMS[key] = stream
    return stream.clone()


_PIECE = 1 << 16
_STREAMS: dict[str, torch.Tensor] = {}  # this process's streams of long texts, by key, the oldest dropped first
_KEEP = 4
_MIN_KEPT_CHARS = 1 << 16  # shorter texts tokenize in milliseconds


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces = [[text[start:start + _PIECE] for start in range(0, len(text), _PIECE)] for text in texts]
    flat = [piece for doc in pieces for piece in doc]  # one call: a fast tokenizer encodes a batch on every core
    encoded = iter(tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else [])
    ids: list[int] = []
    for doc in pieces:
        for _ in doc:
            ids.extend(next(encoded))
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def _stream_key(tokenizer, texts: list[str]) -> str | None:
    """What a stream depends on: the fast tokenizer's definition, its EOS and the texts (None: not kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or sum(map(len, texts)) < _MIN_KEPT_CHARS:
        return None
    digest = hashlib.sha256(f"{_PIECE}:{getattr(tokenizer, 'eos_token_id', None)}:".encode())
    digest.update(backend.to_str().encode())
    for text in texts:
        digest.update(f"\0{len(text)}\0".encode())
        digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def make_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int = 0,
                 at_most: bool = False) -> torch.Tensor:
    """`samples` disjoint windows of `seq_len` tokens, chosen by `seed`: a LongTensor [samples, seq_len].

    A text too short for `samples` windows is an error, unless `at_most`: then every window it has.
    """
    return windows_of(token_stream(tokenizer, texts), samples, seq_len, seed, at_most)


def windows_of(stream: torch.Tensor, samples: int, seq_len: int, seed: int = 0,
               at_most: bool = False) -> torch.Tensor:
    """make_windows() over an already tokenized stream (to draw several sets from one tokenization)."""
    if samples <= 0:
        raise DataError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (got {seq_len})")
    available = len(stream) // seq_len
    if available == 0:
        raise DataError(f"the text has only {len(stream)} tokens, fewer than one window of {seq_len}: "
                        "pass more text or a smaller --seq-len")
    if samples > available and at_most:
        samples = available
    if samples > available:
        raise DataError(f"the text gives only {available} windows of {seq_len} tokens, not {samples}: "
                        f"pass --samples {available} or fewer, a smaller --seq-len, or more text")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:samples].sort().values
    windows = stream[: available * seq_len].view(available, seq_len)[chosen].clone()
    log.info("%d windows of %d tokens from %d available", samples, seq_len, available)
    return windows


def hold_out(texts: list[str], fraction: float) -> tuple[str, str]:
    """The one data-split rule for calibration, healing and evaluation: the texts joined by blank
    lines, cut at the last whitespace (of any kind) before the final `fraction` of the characters.
    Returns (kept, held_out); the held-out text is the end, so it never overlaps what calibration or
    training saw, and the cut falls between words so no token is split across the two. Text with no
    whitespace before that point (Chinese, Japanese) is cut at the character boundary itself, so the
    held-out part is never less than `fraction`."""
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must lie between 0 and 1 (got {fraction})")
    joined = "\n\n".join(texts)
    boundary = int(len(joined) * (1 - fraction))
    last = re.search(r"\s", joined[boundary - 1::-1]) if boundary else None  # searched backwards
    cut = boundary - 1 - last.start() if last else boundary
    return joined[:cut], joined[cut:]
