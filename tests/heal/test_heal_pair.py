"""The teacher/student check: one function for configs (before loading) and models (with depth)."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from compressor.errors import CompressorError
from compressor.heal.pair import check_teacher
from compressor.surgery.edit import drop_blocks_


def test_a_teacher_of_another_vocabulary_width_or_depth_is_refused_with_each_problem():
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    drop_blocks_(student, [1])
    check_teacher(student, teacher, cut_from=4)
    check_teacher(student.config, teacher.config)
    other = tiny_model("llama", vocab_size=96, hidden_size=48, num_hidden_layers=3)
    with pytest.raises(CompressorError) as exc:
        check_teacher(student, other, cut_from=4)
    message = str(exc.value)
    assert "vocabulary 96 vs the student's 128" in message and "width 48 vs the student's 32" in message
    assert "3 blocks vs the 4 the student was cut from" in message and "--teacher" in message
    with pytest.raises(CompressorError, match="width 48"):
        check_teacher(student.config, other.config)
