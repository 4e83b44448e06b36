"""The nbgrader course: its directories, gradebook and submissions, read through nbgrader's own
CourseDirectory; and one submission's notebook and own files, read as data for a worker."""
from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

from .errors import GradingError
from .rebuild import Unreadable, read_submission

__all__ = ["Course", "own_files", "read_task", "imported_modules"]

MAX_OWN_FILES = 64 << 20


class Course:
    """The nbgrader course directory, read through nbgrader's own CourseDirectory and config."""

    def __init__(self, root: Path) -> None:
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config import Config
        from traitlets.config.loader import PyFileConfigLoader

        if not Path(root).is_dir():
            raise GradingError(f"no course directory at {root}")
        self.root = Path(root).resolve()
        config = Config()
        if (self.root / "nbgrader_config.py").is_file():
            config = PyFileConfigLoader("nbgrader_config.py", path=str(self.root)).load_config()
        config.CourseDirectory.root = str(self.root)
        self.dir = CourseDirectory(config=config)
        self.db_url = self.dir.db_url
        self.cache = self.root / ".d2lite" / "reference"
        self.ledgers = self.root / ".d2lite" / "graded"

    def source(self, assignment: str) -> Path:
        return Path(self.dir.format_path(self.dir.source_directory, ".", assignment))

    def submitted(self, student: str, assignment: str) -> Path:
        return Path(self.dir.format_path(self.dir.submitted_directory, student, assignment))

    def autograded(self, student: str, assignment: str) -> Path:
        return Path(self.dir.format_path(self.dir.autograded_directory, student, assignment))

    def students(self, assignment: str) -> list[str]:
        base = Path(self.dir.format_path(self.dir.submitted_directory, ".", ".")).resolve()
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink()
                      and (p / assignment).is_dir() and not (p / assignment).is_symlink())


def own_files(folder: Path | None) -> dict[str, str]:
    """The submission's own regular files (not notebooks, not links, not the timestamp), relative
    path -> base64, up to 64 MiB in all."""
    files: dict[str, str] = {}
    if folder is None or not folder.is_dir() or folder.is_symlink():
        return files
    total = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink() or any(p.is_symlink() for p in path.parents if folder in p.parents):
            continue
        if path.is_file() and path.suffix != ".ipynb" and ".ipynb_checkpoints" not in rel.parts \
                and rel.name != "timestamp.txt":
            total += path.stat().st_size
            if total > MAX_OWN_FILES:
                break
            files[rel.as_posix()] = base64.b64encode(path.read_bytes()).decode()
    return files


def read_task(course: Course, assignment: str, student: str, notebook: str) -> dict:
    """What a worker needs of one submitted notebook, read here: its text (or why it is unreadable)
    and the submission's own files."""
    folder = course.submitted(student, assignment)
    task = {"student": student, "notebook": notebook, "notebook_json": None, "error": None, "files": {}}
    try:
        task["notebook_json"] = json.dumps(read_submission(folder / f"{notebook}.ipynb", folder))
    except Unreadable as error:
        task["error"] = str(error)
    except OSError as error:
        task["error"] = f"the notebook could not be read ({error})"
    if task["error"] is None:
        task["files"] = own_files(folder)
    return task


def code_trees(notebooks):
    """The parsed code cells of ``notebooks`` (cells that do not parse are skipped)."""
    for nb in notebooks:
        for cell in nb.cells:
            if cell.cell_type == "code":
                try:
                    yield ast.parse(cell.source)
                except SyntaxError:
                    continue


def imported_modules(notebooks) -> list[str]:
    """The top-level modules the (instructor's) notebooks import: the warm server imports them once."""
    names = set()
    for tree in code_trees(notebooks):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names)
