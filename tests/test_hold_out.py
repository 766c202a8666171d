"""compressor.data.hold_out, the one data-split rule, on text without spaces (issue 22): the cut falls at
the last whitespace of any kind before the boundary, or at the boundary itself where there is none, and
the held-out part is never less than the fraction asked for."""

from __future__ import annotations

import pytest

from compressor.data import hold_out, load_texts

CJK = "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。" * 20
CODE = "def f(x):\n\treturn x\n" * 50  # newlines and tabs, no spaces


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.5])
def test_text_without_whitespace_is_cut_at_the_character_boundary(fraction):
    kept, held = hold_out([CJK], fraction)
    boundary = int(len(CJK) * (1 - fraction))
    assert (kept, held) == (CJK[:boundary], CJK[boundary:])
    assert len(held) >= fraction * len(CJK)


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.5])
def test_code_is_cut_at_the_last_newline_or_tab_before_the_boundary(fraction):
    kept, held = hold_out([CODE], fraction)
    boundary = int(len(CODE) * (1 - fraction))
    cut = max(CODE.rfind("\n", 0, boundary), CODE.rfind("\t", 0, boundary))
    assert (kept, held) == (CODE[:cut], CODE[cut:])
    assert len(held) >= fraction * len(CODE)


def test_texts_joined_by_blank_lines_cut_between_them():
    texts = [CJK, CJK[::-1]]
    joined = "\n\n".join(texts)
    kept, held = hold_out(texts, 0.4)  # the boundary lies in the second text: the cut is at the blank line
    assert kept + held == joined and kept == CJK + "\n" and held == "\n" + CJK[::-1]


def test_english_prose_is_cut_at_the_last_whitespace():
    texts = load_texts(None)  # the bundled English
    joined = "\n\n".join(texts)
    for fraction in (0.1, 0.15):
        kept, held = hold_out(texts, fraction)
        cut = max(joined.rfind(c, 0, int(len(joined) * (1 - fraction))) for c in " \n\t")
        assert (kept, held) == (joined[:cut], joined[cut:])
