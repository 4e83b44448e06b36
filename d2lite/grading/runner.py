"""`d2lite grade`: every submission of an assignment, each notebook in its own sandbox, one after another."""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

from . import gradebook, policy, sandbox
from .judge import Verdict, cell_events, judge_cell
from .probes import instrument, read_records
from .rebuild import Rebuilt, Unreadable, nbgrader_meta, read_submission, rebuild
from .report import Row, format_table, write_csv

__all__ = ["Course", "grade"]

CACHE_VERSION = 2


class Course:
    """The nbgrader course directory, read through nbgrader's own CourseDirectory and config."""

    def __init__(self, root: Path) -> None:
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config import Config
        from traitlets.config.loader import PyFileConfigLoader

        self.root = Path(root).resolve()
        config = Config()
        if (self.root / "nbgrader_config.py").is_file():
            config = PyFileConfigLoader("nbgrader_config.py", path=str(self.root)).load_config()
        config.CourseDirectory.root = str(self.root)
        self.dir = CourseDirectory(config=config)
        self.db_url = self.dir.db_url
        self.cache = self.root / ".d2lite" / "reference"

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


def _structure(source_nb, test_sources: list[str]) -> set[str]:
    """The names the notebook's does-the-work-itself tests forbid, read from their forbid_calls(...)."""
    from d2lite.checks import BATCH_NORM_LIBRARY_FUNCTIONS

    constants: dict[str, tuple] = {}
    for cell in source_nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, SyntaxError, TypeError):
                    continue
                if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
                    constants[node.targets[0].id] = tuple(value)
    names: list[str] = []
    for source in test_sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("forbid_calls"):
                if not node.args:
                    names += BATCH_NORM_LIBRARY_FUNCTIONS
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names.append(arg.value)
                    elif isinstance(arg, ast.Starred):
                        text = ast.unparse(arg.value)
                        names += (BATCH_NORM_LIBRARY_FUNCTIONS if text.endswith("BATCH_NORM_LIBRARY_FUNCTIONS")
                                  else constants.get(text, ()))
    return policy.structure_names(names)


def _job(rebuilt: Rebuilt) -> dict:
    cells = []
    for i, (cell, role) in enumerate(zip(rebuilt.nb.cells, rebuilt.roles)):
        if cell.cell_type != "code":
            continue
        source = cell.source
        if role == "test":
            try:
                source = instrument(source)
            except SyntaxError:
                pass
        cells.append({"index": i, "source": source})
    return {"cells": cells, "threads": 1}


def _environment() -> tuple[list[Path], dict[str, str]]:
    import d2lite
    from d2lite.data import data_root

    data = data_root()
    binds = [Path(sys.base_prefix), Path(sys.prefix), Path(d2lite.__file__).resolve().parent]
    if data.exists():
        binds.append(data)
    env = {"HOME": "/home/student", "PATH": "/usr/bin:/bin", "D2LITE_DATA": str(data),
           "NBGRADER_EXECUTION": "autograde", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    return binds, env


def _own_files(folder: Path | None, into: Path) -> None:
    """Copy the submission's own regular files (not notebooks, not links) into ``into``."""
    if folder is None or not folder.is_dir():
        return
    total = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink() or any(p.is_symlink() for p in path.parents if folder in p.parents):
            continue
        if path.is_file() and path.suffix != ".ipynb" and ".ipynb_checkpoints" not in rel.parts \
                and rel.name != "timestamp.txt":
            total += path.stat().st_size
            if total > 64 << 20:
                break
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, into / rel)


def _execute(job: dict, files: Path | None, limits: sandbox.Limits):
    binds, env = _environment()
    with tempfile.TemporaryDirectory(prefix="d2lite-submission-") as tmp:
        tmp_path = Path(tmp)
        _own_files(files, tmp_path)
        tmp_path.chmod(0o755)
        for p in tmp_path.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        outcome = sandbox.run(sandbox.python_command(), json.dumps(job).encode(),
                              submission=tmp_path, ro_binds=binds, env=env, limits=limits)
    return cell_events(read_records(outcome.records)), outcome


def reference_events(course: Course, assignment: str, notebook: str, source_nb, icells: dict,
                     limits: sandbox.Limits, refresh: bool = False) -> dict:
    """The reference solution's run: ``cells`` (grade_id -> the records of each test cell), ``job``
    and ``events`` (the whole run), cached per assignment until solutions/ (or d2lite, or torch)
    changes."""
    import torch

    import d2lite

    rebuilt = rebuild(source_nb, source_nb, icells)
    job = _job(rebuilt)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, job, d2lite.__version__, torch.__version__],
                                    sort_keys=True).encode()).hexdigest()
    cache = course.cache / assignment / f"{notebook}.json"
    if not refresh and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored
        except ValueError:
            pass
    events, outcome = _execute(job, course.source(assignment), limits)
    cells = {}
    for i, (cell, role) in enumerate(zip(rebuilt.nb.cells, rebuilt.roles)):
        if role == "test":
            gid = nbgrader_meta(cell)["grade_id"]
            ev = events.get(i)
            if ev is None or ev["end"] is None or not ev["end"].get("ok"):
                detail = (ev or {}).get("end") or {}
                first = next((e["end"] for _, e in sorted(events.items()) if e.get("end") and not e["end"].get("ok")), None)
                if first is not None and first is not detail:
                    detail = first
                raise SystemExit(f"the reference solution of {notebook} fails its own test {gid!r} in the "
                                 f"sandbox ({(detail.get('error') or {}).get('evalue', outcome.killed or 'did not run')}); "
                                 f"sandbox output: {outcome.output[-2000:].decode(errors='replace')}")
            cells[gid] = ev
    stored = {"key": key, "cells": cells, "job": job, "events": {str(i): ev for i, ev in events.items()}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(stored))
    return stored


def _error_output(message: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_output("error", ename="AssertionError", evalue=message,
                                  traceback=["AssertionError: " + message])


def _compose(rebuilt: Rebuilt, events: dict, verdicts: dict[int, Verdict]) -> None:
    for i, cell in enumerate(rebuilt.nb.cells):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        end = (events.get(i) or {}).get("end") or {}
        if end.get("stdout"):
            cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=str(end["stdout"])))
        if i in verdicts:
            if not verdicts[i].passed:
                cell.outputs.append(_error_output(verdicts[i].message))
            continue
        if end.get("stderr"):
            cell.outputs.append(nbformat.v4.new_output("stream", name="stderr", text=str(end["stderr"])))
        if end and not end.get("ok"):
            error = end.get("error") or {}
            cell.outputs.append(nbformat.v4.new_output(
                "error", ename=str(error.get("ename", "Error")), evalue=str(error.get("evalue", "")),
                traceback=[str(t) for t in error.get("traceback", [])][:3]))


def grade_notebook(course: Course, assignment: str, student: str, notebook: str, source_nb, icells: dict,
                   reference: dict, limits: sandbox.Limits) -> Row:
    folder = course.submitted(student, assignment)
    reasons: list[str] = []
    try:
        student_nb = read_submission(folder / f"{notebook}.ipynb", folder)
    except Unreadable as error:
        student_nb, reasons = None, [str(error)]
    except OSError as error:
        student_nb, reasons = None, [f"the notebook could not be read ({error})"]
    rebuilt = rebuild(source_nb, student_nb, icells)
    reasons += rebuilt.notes[:5]
    tests = [i for i, role in enumerate(rebuilt.roles) if role == "test"]
    structure = _structure(source_nb, [rebuilt.nb.cells[i].source for i in tests])
    structural = {i for i in tests if "forbid_calls(" in rebuilt.nb.cells[i].source}
    verdicts: dict[int, Verdict] = {}
    events, outcome = {}, None
    if student_nb is None:
        verdicts = {i: Verdict(False, f"0 points: {reasons[0]}", reasons[0]) for i in tests}
    else:
        modules = set()
        flags: list[policy.Flag] = []
        for i, (cell, role) in enumerate(zip(rebuilt.nb.cells, rebuilt.roles)):
            if cell.cell_type == "code" and role in ("solution", "student"):
                label = nbgrader_meta(cell).get("grade_id") or f"cell {i + 1} (your own)"
                flags += policy.check_cell(cell.source, label, module_names=modules, structure=structure)
        machinery = [f for f in flags if f.kind == "machinery"]
        library = [f for f in flags if f.kind == "structure"]
        job = _job(rebuilt)
        if machinery:
            events, outcome = {}, None  # known-hostile code is not run at all: every test gets 0 below
        elif job == reference["job"] and not any(p.suffix != ".ipynb" for p in folder.iterdir()
                                                 if p.name != "timestamp.txt"):
            # the instructor's own reference notebook, cell for cell: its records are the reference's
            events, outcome = {int(i): ev for i, ev in reference["events"].items()}, None
        else:
            events, outcome = _execute(job, folder, limits)
        for i in tests:
            gid = nbgrader_meta(rebuilt.nb.cells[i])["grade_id"]
            if machinery:
                verdicts[i] = Verdict(False, "0 points: graded code may not reach into the grader's "
                                             f"machinery: {machinery[0]}", "machinery")
            elif library and i in structural:
                verdicts[i] = Verdict(False, f"0 points: {library[0]}", "library")
            else:
                verdicts[i] = judge_cell(events.get(i), reference["cells"][gid], structure)
        reasons += [f"flagged ({f.kind}): {f}" for f in machinery[:3] + library[:3]]
        if outcome is not None and outcome.killed:
            reasons.append({"timeout": f"stopped after {limits.wall:g} s (wall-clock cap)",
                            "memory": f"stopped at the memory cap ({limits.memory / 2**30:g} GiB)",
                            "output": f"stopped: more than {limits.output >> 20} MiB of output",
                            "records": "stopped: too many probe records"}[outcome.killed])
        elif outcome is not None and job["cells"] and (events.get(job["cells"][-1]["index"]) or {}).get("end") is None:
            reasons.append(f"the notebook stopped early (exit status {outcome.returncode})")
        if outcome is not None and outcome.leftover:
            reasons.append(f"{outcome.leftover} process(es) still running at the end were killed")
    _compose(rebuilt, events, verdicts)
    for i in tests:
        if not verdicts[i].passed and verdicts[i].reason not in ("machinery", "library") and student_nb is not None:
            gid = nbgrader_meta(rebuilt.nb.cells[i])["grade_id"]
            reasons.append(f"{gid}: {verdicts[i].message.splitlines()[0][:160]}")
    autograded = course.autograded(student, assignment)
    stamp = gradebook.copy_timestamp(folder, autograded) if folder.is_dir() and not folder.is_symlink() else None
    gradebook.save(course.db_url, assignment, student, notebook, rebuilt.nb, autograded, stamp)
    score = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i in tests if verdicts[i].passed)
    most = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i in tests)
    return Row(student, notebook, score, most, outcome.seconds if outcome else 0.0,
               (outcome.peak_memory if outcome else 0) / 2**20, reasons)


def grade(root: Path, assignment: str, students: list[str] | None = None,
          limits: sandbox.Limits = sandbox.Limits(), refresh_reference: bool = False,
          report: Path | None = None, echo=print, notebooks: list[str] | None = None) -> list[Row]:
    """Grade every (or the named) student's submission of ``assignment`` (every notebook, or the
    named ones); return the report's rows."""
    if not Path(root).is_dir():
        raise SystemExit(f"no course directory at {root}")
    sandbox.check_features()
    course = Course(root)
    if course.db_url.startswith("sqlite:///") and not Path(course.db_url.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"no gradebook at {course.db_url.removeprefix('sqlite:///')}: run `nbgrader "
                         f"generate_assignment {assignment}` in the course directory first")
    known_notebooks = gradebook.notebook_names(course.db_url, assignment)
    unknown = [n for n in (notebooks or []) if n not in known_notebooks]
    if unknown:
        raise SystemExit(f"{assignment!r} has no notebook {', '.join(unknown)}; it has {', '.join(known_notebooks)}")
    notebooks = notebooks or known_notebooks
    known = course.students(assignment)
    if students:
        unknown = [s for s in students if s not in known]
        if unknown:
            raise SystemExit(f"no submission of {assignment!r} for {', '.join(unknown)} under "
                             f"{course.dir.submitted_directory}/")
    students = students or known
    sources, icells, references = {}, {}, {}
    for name in notebooks:
        sources[name] = nbformat.read(str(course.source(assignment) / f"{name}.ipynb"), as_version=4)
        icells[name] = gradebook.instructor_cells(course.db_url, assignment, name)
        references[name] = reference_events(course, assignment, name, sources[name], icells[name], limits,
                                            refresh_reference)
    rows: list[Row] = []
    for student in students:
        for name in notebooks:
            try:
                row = grade_notebook(course, assignment, student, name, sources[name], icells[name],
                                     references[name], limits)
            except (SystemExit, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001 — one notebook's failure never stops the batch
                row = Row(student, name, 0.0, 0.0, reasons=[f"internal error, graded 0: {type(error).__name__}: {error}"])
                try:
                    rebuilt = rebuild(sources[name], None, icells[name])
                    _compose(rebuilt, {}, {i: Verdict(False, row.reasons[0]) for i, role in
                                           enumerate(rebuilt.roles) if role == "test"})
                    gradebook.save(course.db_url, assignment, student, name, rebuilt.nb,
                                   course.autograded(student, assignment), None)
                except Exception as again:  # noqa: BLE001
                    row.reasons.append(f"and the gradebook could not be written: {again}")
            rows.append(row)
            echo(f"{student}/{name}: {row.score:g}/{row.max_score:g} in {row.seconds:.1f} s"
                 + (f" — {row.reason[:200]}" if row.reasons else ""))
    path = write_csv(rows, report or course.root / "reports" / f"{assignment}.csv")
    echo("\n" + format_table(rows) + f"\n\nreport written to {path}")
    return rows
