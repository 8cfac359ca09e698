"""The report compares students with the teacher on the same held-out windows, not the teacher job's own."""

from __future__ import annotations

from cluster.pipeline.report import Doc, section_kd


def _m(**metrics):
    return {"name": "m", "version": 1, "size_bytes": 1, "metrics": metrics}


def test_kd_table_uses_the_teacher_measured_on_the_students_windows():
    models = {
        "teacher": _m(val_ppl=130.0),
        "student": _m(val_ppl=149.0, teacher_val_ppl=111.0),
        "student (no KD)": _m(val_ppl=200.0),
    }  # the no-KD job (top-k cache, alpha 0) has no teacher ppl
    doc = Doc()
    section_kd(doc, models)
    text = doc.markdown()
    assert "1.34×" in text and "1.80×" in text and "0.74×" in text  # 149/111, 200/111, 149/200
    assert "1.15×" not in text  # 149/130: the teacher job's own windows would flatter the student
