"""The single writer of nbgrader's gradebook: the tables `nbgrader autograde` fills, through
nbgrader's own SaveAutoGrades preprocessor, and the autograded notebooks beside them."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat

__all__ = ["copy_timestamp", "graded_notebooks", "instructor_cells", "notebook_names", "save"]


def notebook_names(db_url: str, assignment: str) -> list[str]:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url) as gb:
        try:
            return sorted(nb.name for nb in gb.find_assignment(assignment).notebooks)
        except MissingEntry:
            raise SystemExit(f"the gradebook has no assignment {assignment!r}: run `nbgrader "
                             f"generate_assignment {assignment}` first") from None


def instructor_cells(db_url: str, assignment: str, notebook: str) -> dict[str, dict]:
    """grade_id -> the instructor's copy of every locked, solution or graded cell, as the gradebook holds it."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url) as gb:
        nb = gb.find_notebook(notebook, assignment)
        cells = {c.name: {"source": c.source, "cell_type": c.cell_type, "checksum": c.checksum,
                          "locked": c.locked} for c in nb.source_cells}
        for g in nb.grade_cells:
            cells.setdefault(g.name, {})["points"] = g.max_score
    return cells


def graded_notebooks(db_url: str, assignment: str) -> set[tuple[str, str]]:
    """(student, notebook) pairs the gradebook holds a submitted notebook for."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url) as gb:
        try:
            return {(sub.student.id, nb.name) for sub in gb.find_assignment(assignment).submissions
                    for nb in sub.notebooks}
        except MissingEntry:
            return set()


def save(db_url: str, assignment: str, student: str, notebook: str, nb: nbformat.NotebookNode,
         autograded_dir: Path, timestamp: str | None) -> None:
    """Write ``nb`` (the composed autograded notebook: test cells carry the verdict as their output)
    to autograded/ and its grades and comments to the gradebook, as `nbgrader autograde` does."""
    from nbgrader.api import Gradebook
    from nbgrader.preprocessors import SaveAutoGrades

    with Gradebook(db_url) as gb:
        gb.update_or_create_student(student)
        if timestamp:
            gb.update_or_create_submission(assignment, student, timestamp=timestamp)
        else:
            gb.update_or_create_submission(assignment, student)
    resources = {"nbgrader": {"notebook": notebook, "assignment": assignment, "student": student,
                              "db_url": db_url}}
    SaveAutoGrades().preprocess(nb, resources)
    autograded_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(autograded_dir / f"{notebook}.ipynb"))


def copy_timestamp(submission_dir: Path, autograded_dir: Path) -> str | None:
    stamp = submission_dir / "timestamp.txt"
    if stamp.is_file() and not stamp.is_symlink() and stamp.stat().st_size < 200:
        autograded_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(stamp, autograded_dir / "timestamp.txt")
        return stamp.read_text(errors="replace").strip() or None
    return None
