"""Block indices: the one home for reading, counting and printing which decoder blocks a plan names.

    parse_blocks("3,5-7", 30)   -> [3, 5, 6, 7]
    runs([3, 4, 5, 9])          -> [(3, 6), (9, 10)]     maximal runs, [start, end)
    ranges_text([3, 4, 5, 9])   -> "3-5, 9"
    num_blocks(model)           -> the model's depth, through its adapter
"""

from __future__ import annotations

from collections.abc import Iterable

from compressor.errors import InvalidPlanError


def num_blocks(model) -> int:
    """How many decoder blocks the model has now."""
    from compressor.adapters import get_adapter

    return get_adapter(model).num_blocks(model)


def parse_blocks(spec: str | Iterable[int], num_blocks: int) -> list[int]:
    """Parse "3,5-7" (ranges inclusive) into sorted indices, validating them against the depth."""
    if isinstance(spec, str):
        indices: list[int] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise InvalidPlanError(f"block range '{part}' is empty: write it low-high")
                    indices.extend(range(lo, hi + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise InvalidPlanError(f"cannot read block '{part}': use indices like 3,5-7") from None
    else:
        indices = [int(i) for i in spec]
    if not indices:
        raise InvalidPlanError("no blocks given: use indices like 3,5-7")
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise InvalidPlanError(f"block indices repeat: {dupes}")
    bad = [i for i in indices if not 0 <= i < num_blocks]
    if bad:
        raise InvalidPlanError(f"block indices {bad} are out of range: the model has blocks 0-{num_blocks - 1}")
    if len(indices) >= num_blocks:
        raise InvalidPlanError(f"cannot remove all {num_blocks} blocks: keep at least one")
    return sorted(indices)


def runs(indices) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as [start, end) pairs."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1]:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [(s, e) for s, e in spans]


def ranges_text(indices) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    return ", ".join(f"{s}" if e == s + 1 else f"{s}-{e - 1}" for s, e in runs(indices))


def next_kept(block: int, removed: set[int], n: int) -> int | None:
    """The first kept block after `block` (None: it was the last)."""
    return next((i for i in range(block + 1, n) if i not in removed), None)


def spread_blocks(num_blocks: int, k: int) -> list[int]:
    """k block indices spread evenly over the depth (which ones is irrelevant to cost in a
    uniform stack; spreading them keeps mixed stacks, e.g. sliding/global attention, in proportion)."""
    return [int((i + 0.5) * num_blocks / k) for i in range(k)]
