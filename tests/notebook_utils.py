"""Shared by the notebook and grading tests: where the notebooks are, and how nbgrader is set up."""
import os
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "batch_norm"
SOLUTIONS = ROOT / "solutions" / ASSIGNMENT
CHAPTERS = ROOT / "chapters" / ASSIGNMENT
NOTEBOOKS = ["00_from_scratch", "01_bias", "02_learning_rates", "03_every_layer", "04_dropout",
             "05_fixed_gamma_beta", "06_api", "07_lite", "08_other_normalizations",
             "09_input_normalization", "10_distributed"]


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def cell_by_id(nb, grade_id: str):
    """The cell of ``nb`` with this nbgrader grade id."""
    return next(c for c in nb.cells if nbgrader_meta(c).get("grade_id") == grade_id)


def grade_cells(nb) -> list:
    return [c for c in nb.cells if nbgrader_meta(c).get("grade")]


def nbgrader_env() -> dict:
    """nbgrader shells out to ``alembic`` (installed beside this Python): put it on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def nbgrader_config(**course):
    """The course's nbgrader_config.py as a traitlets Config, with CourseDirectory overrides."""
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    for key, value in course.items():
        setattr(config.CourseDirectory, key, value)
    return config


def new_course(root: Path, exchange: Path, solutions: Path = SOLUTIONS, assignment: str = ASSIGNMENT):
    """A course directory at ``root``: the solutions (the chapter's, or those in ``solutions`` as
    ``assignment``), the project's nbgrader_config.py, and the assignment generated (nbgrader's bin
    directory must be on PATH). Returns an NbGraderAPI on it."""
    import shutil

    from nbgrader.apps import NbGraderAPI

    shutil.copytree(solutions, root / "solutions" / assignment)
    shutil.copy(ROOT / "nbgrader_config.py", root)
    config = nbgrader_config(root=str(root))
    config.Exchange.root = str(exchange)
    api = NbGraderAPI(config=config)
    result = api.generate_assignment(assignment)
    assert result["success"], result["error"] + result["log"][-3000:]
    return api
