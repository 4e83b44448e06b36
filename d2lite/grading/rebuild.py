"""A submission made whole again from the instructor's copy: cells, points, grade ids, kernelspec."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

__all__ = ["MAX_NOTEBOOK_BYTES", "Rebuilt", "Unreadable", "read_submission", "rebuild", "nbgrader_meta"]

MAX_NOTEBOOK_BYTES = 20 << 20


class Unreadable(Exception):
    """A submitted notebook that cannot be graded; the message is the report's reason."""


def nbgrader_meta(cell) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def read_submission(path: Path, folder: Path) -> nbformat.NotebookNode:
    """The student's notebook at ``path`` (inside ``folder``), or Unreadable with the reason."""
    if not os.path.lexists(path):
        raise Unreadable("no such notebook was submitted")
    real_folder = folder.resolve()
    if path.is_symlink() or path.resolve().parent != real_folder:
        raise Unreadable("the submitted notebook is a symbolic link, not a file of the submission")
    if not path.is_file():
        raise Unreadable("the submitted notebook is not a regular file")
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
        data = fh.read(MAX_NOTEBOOK_BYTES + 1)
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise Unreadable(f"the notebook is larger than {MAX_NOTEBOOK_BYTES >> 20} MiB")
    try:
        raw = json.loads(data)
    except ValueError as error:
        raise Unreadable(f"the file is not a notebook (not valid JSON: {error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        raise Unreadable("the file is not a notebook (no list of cells)")
    try:
        nb = nbformat.reads(data.decode("utf-8", errors="replace"), as_version=4)
    except Exception as error:  # noqa: BLE001 — nbformat raises several kinds
        raise Unreadable(f"the file is not a readable notebook ({type(error).__name__}: {error})") from None
    for cell in nb.cells:
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise Unreadable("the notebook has a cell of unknown type")
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(str(s) for s in cell["source"])
        if not isinstance(cell.get("source", ""), str):
            raise Unreadable("the notebook has a cell whose source is not text")
    return nb


@dataclass
class Rebuilt:
    """The notebook to grade. ``roles[i]`` says whose cell ``nb.cells[i]`` is: ``test`` (an
    instructor's autograded test cell), ``instructor`` (the instructor's code or text, unchanged),
    ``solution`` (the student's answer in a solution cell), ``student`` (a cell the student added or
    changed, ungraded)."""

    nb: nbformat.NotebookNode
    roles: list[str]
    notes: list[str] = field(default_factory=list)


def _norm(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def rebuild(source_nb: nbformat.NotebookNode, student_nb: nbformat.NotebookNode | None,
            instructor_cells: dict[str, dict]) -> Rebuilt:
    """Rebuild a submission from the instructor's source notebook.

    instructor_cells: grade_id -> {"source", "cell_type", "checksum", "locked", "points"} as the
    gradebook holds them (locked and graded cells with their hidden tests; solution cells as stubs).
    Every cell with a grade id comes from the instructor in the source's order, except the text of
    solution cells, which is the student's (the stub where the student has none); the student's
    other cells are kept after the instructor cell they followed, without nbgrader metadata.
    ``student_nb`` None rebuilds the unanswered release.
    """
    anchors = [c for c in source_nb.cells if nbgrader_meta(c).get("grade_id")]
    anchor_ids = {nbgrader_meta(c)["grade_id"] for c in anchors}
    instructor_text = {_norm(c.get("source", "")) for c in source_nb.cells}
    instructor_text |= {_norm(c["source"]) for c in instructor_cells.values()}
    answers: dict[str, str] = {}
    segments: dict[str | None, list] = {None: []}
    notes: list[str] = []
    current = None
    for cell in (student_nb.cells if student_nb is not None else []):
        gid = nbgrader_meta(cell).get("grade_id")
        if isinstance(gid, str) and gid in anchor_ids and gid not in segments:
            current = gid
            segments[gid] = []
            answers[gid] = cell.get("source", "")
            continue
        if gid:
            notes.append(f"a cell claiming grade id {str(gid)[:60]!r} was kept as an ordinary cell")
        if cell.get("cell_type") not in ("code", "markdown"):
            continue
        segments[current].append(cell)

    cells, roles = [], []

    def add_student(cell) -> None:
        new = (nbformat.v4.new_code_cell if cell["cell_type"] == "code" else nbformat.v4.new_markdown_cell)(
            cell.get("source", ""))
        cells.append(new)
        code = cell["cell_type"] == "code"
        roles.append("instructor" if (not code or _norm(new.source) in instructor_text) else "student")

    for cell in segments[None]:
        add_student(cell)
    for anchor in anchors:
        meta = copy.deepcopy(nbgrader_meta(anchor))
        gid = meta["grade_id"]
        stored = instructor_cells.get(gid, {})
        cell_type = stored.get("cell_type", anchor["cell_type"])
        if meta.get("solution"):
            if gid in answers:
                text, role = answers[gid], "solution"
            else:
                text, role = stored.get("source", ""), "solution"
                if student_nb is not None:
                    notes.append(f"the answer cell {gid!r} was missing; graded as unanswered")
        else:
            text = stored.get("source", anchor.get("source", ""))
            role = "test" if (meta.get("grade") and cell_type == "code") else "instructor"
            if student_nb is not None and gid not in segments:
                notes.append(f"the cell {gid!r} was missing and has been put back")
        if "checksum" in stored:
            meta["checksum"] = stored["checksum"]
        if stored.get("points") is not None and meta.get("grade"):
            meta["points"] = stored["points"]
        new = (nbformat.v4.new_code_cell if cell_type == "code" else nbformat.v4.new_markdown_cell)(text)
        new.metadata["nbgrader"] = meta
        cells.append(new)
        roles.append(role)
        for cell in segments.get(gid, []):
            add_student(cell)
    nb = nbformat.v4.new_notebook(cells=cells, metadata=copy.deepcopy(source_nb.metadata))
    return Rebuilt(nb, roles, notes)
