"""The single writer of nbgrader's gradebook: the tables `nbgrader autograde` fills, through
nbgrader's own SaveAutoGrades preprocessor, and the autograded notebooks beside them."""
from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import nbformat

from .errors import GradingError

__all__ = ["copy_files", "graded_notebooks", "instructor_cells", "notebook_names", "save"]


def notebook_names(db_url: str, assignment: str) -> list[str]:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url) as gb:
        try:
            return sorted(nb.name for nb in gb.find_assignment(assignment).notebooks)
        except MissingEntry:
            raise GradingError(f"the gradebook has no assignment {assignment!r}: run `nbgrader "
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


MAX_COPIED = 64 << 20  # bytes of a submission's other files copied to autograded/


def _plain_files(folder: Path, ignore: list[str]):
    """The regular files under ``folder`` that are not notebooks, not links and not under a link,
    and that match none of the course's ignore patterns (CourseDirectory.ignore)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink()
                             and not any(fnmatch.fnmatch(d, g) for g in ignore))
        for name in sorted(filenames):
            path = here / name
            if name.endswith(".ipynb") or path.is_symlink() or not path.is_file() \
                    or any(fnmatch.fnmatch(name, g) for g in ignore):
                continue
            yield path.relative_to(folder)


def copy_files(submission_dir: Path, autograded_dir: Path, source_dir: Path, ignore: list[str]) -> str | None:
    """Copy the submission's other files (timestamp.txt, the exchange's submission_secret.txt that
    release_feedback needs, the student's data files) to autograded/, then the instructor's own
    files from the source directory over them, as `nbgrader autograde` does. Links are never
    followed and at most MAX_COPIED bytes are copied. Returns the submission's timestamp, if any."""
    autograded_dir.mkdir(parents=True, exist_ok=True)
    for folder, left in ((submission_dir, MAX_COPIED), (source_dir, None)):  # the instructor's: no cap
        for rel in _plain_files(folder, ignore):
            if left is not None:
                size = (folder / rel).stat().st_size
                if size > left:
                    continue
                left -= size
            dest = autograded_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            shutil.copy(folder / rel, dest)
    stamp = autograded_dir / "timestamp.txt"
    if stamp.is_file() and stamp.stat().st_size < 200:
        return stamp.read_text(errors="replace").strip() or None
    return None
