"""Which code runs where: the answer cells in the student's process, the tests in the checker.

A rebuilt notebook (rebuild.py) becomes the checker's job. Each code cell gets a role:

- ``student``: the student's answers and own cells, and the instructor's unlocked cells (demos,
  experiments): they run in the student's process only;
- ``both``: the instructor's locked cells (setup, reveals): they run in the student's process and
  again in the checker, so that the tests see the instructor's own helpers and data;
- ``test``: the instructor's autograded test cells: they run in the checker only, and the
  student's process never sees their source.

The answer names are the names the reference solution cells bind at top level: a test that uses
one always gets the student's object, even where the checker has a name of its own.
"""
from __future__ import annotations

import ast

from .rebuild import Rebuilt, nbgrader_meta

__all__ = ["checker_job", "answer_names", "hidden_ranges"]

BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def hidden_ranges(source: str) -> list[tuple[int, int]]:
    """The (first, last) line numbers of each hidden-tests block of a test cell (markers included)."""
    ranges, start = [], None
    for number, line in enumerate(source.splitlines(), start=1):
        text = line.strip()
        if text == BEGIN_HIDDEN and start is None:
            start = number
        elif text == END_HIDDEN and start is not None:
            ranges.append((start, number))
            start = None
    if start is not None:
        ranges.append((start, len(source.splitlines())))
    return ranges


def answer_names(source_nb) -> list[str]:
    """The names bound at top level by the reference notebook's solution cells."""
    return sorted(set().union(*answers_by_cell(source_nb).values()))


def answers_by_cell(source_nb) -> dict[str, set[str]]:
    """grade_id of each solution code cell -> the names it binds at top level (in the reference)."""
    out = {}
    for cell in source_nb.cells:
        if cell.cell_type == "code" and nbgrader_meta(cell).get("solution"):
            out[nbgrader_meta(cell).get("grade_id", "")] = _bound(cell.source)
    return out


def names_used(source: str) -> set[str]:
    """The names a cell reads (anywhere, nested functions included)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _bound(source: str) -> set[str]:
    names: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return names
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def roles(rebuilt: Rebuilt) -> list[str | None]:
    """Each cell's role in the split (None for markdown)."""
    out = []
    for cell, role in zip(rebuilt.nb.cells, rebuilt.roles):
        if cell.cell_type != "code":
            out.append(None)
        elif role == "test":
            out.append("test")
        elif role == "instructor" and nbgrader_meta(cell).get("locked") and nbgrader_meta(cell).get("grade_id"):
            out.append("both")
        else:
            out.append("student")
    return out


def checker_job(rebuilt: Rebuilt, answers: list[str], files: dict, wall: float) -> dict:
    """The checker's job for one rebuilt notebook: every code cell with its role, the test cells'
    sources (hidden tests included: they never leave the checker), the answer names and the
    submission's own files (written into the student's home before the first cell)."""
    cells = []
    for i, (cell, role) in enumerate(zip(rebuilt.nb.cells, roles(rebuilt))):
        if role is None:
            continue
        entry = {"index": i, "role": role, "source": cell.source}
        if role == "test":
            entry["grade_id"] = nbgrader_meta(cell)["grade_id"]
            entry["hidden"] = hidden_ranges(cell.source)
        cells.append(entry)
    return {"cells": cells, "answers": answers, "files": files, "wall": wall}
