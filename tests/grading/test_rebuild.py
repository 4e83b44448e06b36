"""rebuild.py: a submission made whole again from the instructor's copy."""
import json

import nbformat
import pytest

from notebook_utils import SOLUTIONS, cell_by_id, read

from d2lite.grading.rebuild import Unreadable, nbgrader_meta, read_submission, rebuild

NB = "00_from_scratch"


def _icells(nb):
    return {nbgrader_meta(c)["grade_id"]: {"source": c.source, "cell_type": c.cell_type,
                                           "points": nbgrader_meta(c).get("points")}
            for c in nb.cells if nbgrader_meta(c).get("grade_id")}


@pytest.fixture
def source():
    return read(SOLUTIONS / f"{NB}.ipynb")


def _tests(rebuilt):
    return {nbgrader_meta(c)["grade_id"]: c.source for c, r in zip(rebuilt.nb.cells, rebuilt.roles) if r == "test"}


def test_tampered_deleted_and_retyped_test_cells_come_back_from_the_instructor(source):
    student = read(SOLUTIONS / f"{NB}.ipynb")
    cell_by_id(student, "test_eps").source = "pass"
    student.cells = [c for c in student.cells if nbgrader_meta(c).get("grade_id") != "test_momentum"]
    retyped = cell_by_id(student, "test_eval")
    retyped["cell_type"] = "markdown"
    rebuilt = rebuild(source, student, _icells(source))
    assert _tests(rebuilt) == _tests(rebuild(source, source, _icells(source)))
    assert any("test_momentum" in n and "put back" in n for n in rebuilt.notes)


def test_a_pasted_copy_of_a_test_cell_is_an_ordinary_cell_and_points_are_the_instructors(source):
    student = read(SOLUTIONS / f"{NB}.ipynb")
    copy = nbformat.from_dict(json.loads(json.dumps(cell_by_id(student, "test_eps"))))
    student.cells.insert(3, copy)
    for cell in student.cells:
        if nbgrader_meta(cell).get("grade"):
            cell.metadata["nbgrader"]["points"] = 100
    rebuilt = rebuild(source, student, _icells(source))
    roles = [r for c, r in zip(rebuilt.nb.cells, rebuilt.roles) if c.source == copy.source]
    assert roles.count("test") == 1 and len(roles) == 2  # the copy runs as an ordinary cell of the student
    assert sum(nbgrader_meta(c).get("points", 0) for c, r in zip(rebuilt.nb.cells, rebuilt.roles) if r == "test") == 14


def test_the_answers_are_the_students_and_everything_else_the_instructors(source):
    student = read(SOLUTIONS / f"{NB}.ipynb")
    cell_by_id(student, "batch_norm_impl").source = "def batch_norm(*a):\n    return 'mine'\n"
    cell_by_id(student, "setup").source = "import os  # a changed setup cell"
    rebuilt = rebuild(source, student, _icells(source))
    cells = {nbgrader_meta(c).get("grade_id"): (c, r) for c, r in zip(rebuilt.nb.cells, rebuilt.roles)}
    assert cells["batch_norm_impl"] == (cells["batch_norm_impl"][0], "solution")
    assert "'mine'" in cells["batch_norm_impl"][0].source
    assert cells["setup"][0].source == cell_by_id(source, "setup").source


@pytest.mark.parametrize("data, words", [(b'{"cells": [', "not valid JSON"), (b"[1, 2]", "not a notebook"),
                                         (b'{"cells": [{"cell_type": "weird", "source": ""}]}', "not a readable")])
def test_unreadable_submissions_say_why(tmp_path, data, words):
    path = tmp_path / f"{NB}.ipynb"
    path.write_bytes(data)
    with pytest.raises(Unreadable, match=words):
        read_submission(path, tmp_path)


def test_a_linked_submission_is_refused(tmp_path):
    (tmp_path / f"{NB}.ipynb").symlink_to(SOLUTIONS / f"{NB}.ipynb")
    with pytest.raises(Unreadable, match="symbolic link"):
        read_submission(tmp_path / f"{NB}.ipynb", tmp_path)
