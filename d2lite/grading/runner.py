"""`d2lite grade`: tasks in, records out — every (student, notebook) of an assignment graded in a warm
sandbox, on N local workers or on a Dask cluster, with the gradebook written here only.

A task carries one submitted notebook (its JSON and the submission's own files) and the notebook's
context (the instructor's copy and the reference records); it comes back as data only: the report
line, the autograded notebook and the records. The coordinator (this process) is the single writer
of the gradebook and of the ledger in .d2lite/graded/ that lets an interrupted run resume.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import nbformat

from . import gradebook, policy, sandbox
from .judge import Verdict, cell_events, judge_cell
from .probes import instrument, read_records
from .rebuild import Rebuilt, Unreadable, nbgrader_meta, read_submission, rebuild
from .report import Row, format_table, write_csv

__all__ = ["Course", "grade", "grade_task", "execute_job"]

CACHE_VERSION = 3
MAX_OWN_FILES = 64 << 20


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


def _code_trees(notebooks):
    """The parsed code cells of ``notebooks`` (cells that do not parse are skipped)."""
    for nb in notebooks:
        for cell in nb.cells:
            if cell.cell_type == "code":
                try:
                    yield ast.parse(cell.source)
                except SyntaxError:
                    continue


def _structure(source_nb, test_sources: list[str]) -> set[str]:
    """The names the notebook's does-the-work-itself tests forbid, read from their forbid_calls(...)."""
    from d2lite.checks import BATCH_NORM_LIBRARY_FUNCTIONS

    constants: dict[str, tuple] = {}
    for tree in _code_trees([source_nb]):
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


def imported_modules(notebooks) -> list[str]:
    """The top-level modules the (instructor's) notebooks import: the warm server imports them once."""
    names = set()
    for tree in _code_trees(notebooks):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names)


# --- the worker's side: one warm sandbox per worker thread, created on first use --------------

_local = threading.local()
_warm_lock = threading.Lock()
_all_warm: list = []
_checked = False


def _warm(limits: sandbox.Limits, modules: list[str]) -> sandbox.Warm:
    global _checked
    key = (limits, tuple(modules))
    warm = getattr(_local, "warm", None)
    if warm is not None and warm.alive and warm.key == key:
        return warm
    if warm is not None:
        warm.close()
    with _warm_lock:
        if not _checked:
            sandbox.check_features()
            _checked = True
    binds, env = _environment()
    warm = sandbox.Warm(binds, env, limits, modules)
    warm.key = key
    _local.warm = warm
    with _warm_lock:
        _all_warm.append(warm)
    return warm


def close_sandboxes() -> None:
    """End every warm sandbox this process started (their running notebooks with them)."""
    with _warm_lock:
        warms, _all_warm[:] = list(_all_warm), []
    for warm in warms:
        warm.close()


def execute_job(job: dict, limits: sandbox.Limits, modules: list[str]) -> dict:
    """Run one job in this worker's warm sandbox: its events (cell index -> records) and what the
    sandbox said (exit status, cap hit, seconds, peak memory, leftover processes, output tail)."""
    warm = _warm(limits, modules)
    outcome = warm.run(json.dumps(job).encode(), limits)
    if outcome.returncode is None and outcome.notes:  # the server itself failed: one retry on a new one
        warm = _warm(limits, modules)
        outcome = warm.run(json.dumps(job).encode(), limits)
    events = cell_events(read_records(outcome.records))
    return {"events": {str(i): ev for i, ev in events.items()},
            "outcome": {"returncode": outcome.returncode, "killed": outcome.killed, "leftover": outcome.leftover,
                        "seconds": outcome.seconds, "peak_memory": outcome.peak_memory,
                        "output": outcome.output[-4000:].decode(errors="replace"), "notes": outcome.notes}}


def _events(result: dict) -> dict[int, dict]:
    return {int(i): ev for i, ev in result["events"].items()}


# --- the reference solution's records, cached per assignment --------------------------------

def reference_job(course: Course, assignment: str, notebook: str, source_nb, icells: dict) -> tuple[dict, str, Path]:
    import torch

    import d2lite

    rebuilt = rebuild(source_nb, source_nb, icells)
    job = {**_job(rebuilt), "files": own_files(course.source(assignment))}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, job, d2lite.__version__, torch.__version__],
                                    sort_keys=True).encode()).hexdigest()
    return job, key, course.cache / assignment / f"{notebook}.json"


def cached_reference(path: Path, key: str) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == key else None


def store_reference(notebook: str, source_nb, icells: dict, job: dict, key: str, path: Path, result: dict) -> dict:
    """Check that the reference passes every test of its own, then cache its records."""
    rebuilt = rebuild(source_nb, source_nb, icells)
    events, outcome = _events(result), result["outcome"]
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
                                 f"sandbox ({(detail.get('error') or {}).get('evalue', outcome['killed'] or 'did not run')}); "
                                 f"sandbox output: {outcome['output'][-2000:]}")
            cells[gid] = ev
    stored = {"key": key, "cells": cells, "job": job, "events": result["events"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored))
    os.replace(tmp, path)
    return stored


# --- one (student, notebook): the task, run where the sandbox is -----------------------------

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


# CPython 3.11 keeps the AST recursion depth per interpreter, not per thread: ast.parse/compile in
# two threads at once can raise "SystemError: AST constructor recursion depth mismatch". Worker
# threads hold this lock for everything but the sandbox run.
_ast_lock = threading.Lock()


def grade_task(task: dict, context: dict, limits: sandbox.Limits) -> dict:
    """Grade one submitted notebook (runs on a worker: locally or on a Dask worker). Returns data only:
    ``row`` (the report line), ``autograded`` (the notebook, JSON) and ``events`` (the records)."""
    with _ast_lock:
        return _grade_task(task, context, limits)


def _execute_unlocked(job: dict, limits: sandbox.Limits, modules: list[str]) -> dict:
    _ast_lock.release()
    try:
        return execute_job(job, limits, modules)
    finally:
        _ast_lock.acquire()


def _grade_task(task: dict, context: dict, limits: sandbox.Limits) -> dict:
    source_nb = nbformat.reads(context["source"], as_version=4)
    icells, reference = context["icells"], context["reference"]
    reasons: list[str] = []
    student_nb = None
    if task["error"] is not None:
        reasons = [task["error"]]
    else:
        student_nb = nbformat.from_dict(json.loads(task["notebook_json"]))  # read_submission validated it
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
        job = {**_job(rebuilt), "files": task["files"]}
        if machinery:
            pass  # known-hostile code is not run at all: every test gets 0 below
        elif job["cells"] == reference["job"]["cells"] and not task["files"]:
            # the instructor's own reference notebook, cell for cell: its records are the reference's
            events = {int(i): ev for i, ev in reference["events"].items()}
        else:
            result = _execute_unlocked(job, limits, context["modules"])
            events, outcome = _events(result), result["outcome"]
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
        if outcome is not None and outcome["notes"]:
            reasons += outcome["notes"]
        elif outcome is not None and outcome["killed"]:
            reasons.append({"timeout": f"stopped after {limits.wall:g} s (wall-clock cap)",
                            "memory": f"stopped at the memory cap ({limits.memory / 2**30:g} GiB)",
                            "output": f"stopped: more than {limits.output >> 20} MiB of output",
                            "records": "stopped: too many probe records"}[outcome["killed"]])
        elif outcome is not None and job["cells"] and (events.get(job["cells"][-1]["index"]) or {}).get("end") is None:
            reasons.append(f"the notebook stopped early (exit status {outcome['returncode']})")
        if outcome is not None and outcome["leftover"]:
            reasons.append(f"{outcome['leftover']} process(es) still running at the end were killed")
    _compose(rebuilt, events, verdicts)
    for i in tests:
        if not verdicts[i].passed and verdicts[i].reason not in ("machinery", "library") and student_nb is not None:
            gid = nbgrader_meta(rebuilt.nb.cells[i])["grade_id"]
            reasons.append(f"{gid}: {verdicts[i].message.splitlines()[0][:160]}")
    score = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i in tests if verdicts[i].passed)
    most = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i in tests)
    row = Row(task["student"], task["notebook"], score, most, outcome["seconds"] if outcome else 0.0,
              (outcome["peak_memory"] if outcome else 0) / 2**20, reasons)
    return {"row": asdict(row), "autograded": nbformat.writes(rebuilt.nb),
            "events": {str(i): ev for i, ev in events.items()}}


def _failed_result(task: dict, context: dict, message: str) -> dict:
    """A task that could not be graded (an internal error): every test cell 0, with the reason."""
    source_nb = nbformat.reads(context["source"], as_version=4)
    rebuilt = rebuild(source_nb, None, context["icells"])
    _compose(rebuilt, {}, {i: Verdict(False, message) for i, role in enumerate(rebuilt.roles) if role == "test"})
    most = sum(float(nbgrader_meta(c).get("points", 0)) for c, role in zip(rebuilt.nb.cells, rebuilt.roles)
               if role == "test")
    row = Row(task["student"], task["notebook"], 0.0, most, reasons=[message])
    return {"row": asdict(row), "autograded": nbformat.writes(rebuilt.nb), "events": {}, "failed": True}


# --- where tasks run: local threads (one warm sandbox each) or a Dask cluster ----------------

class LocalWorkers:
    """N worker threads in this process, each with its own warm sandbox."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d2lite-grade")

    def prewarm(self, limits: sandbox.Limits, modules: list[str]) -> None:
        """Start every worker's warm sandbox now, while the coordinator reads the course."""
        barrier = threading.Barrier(self.workers)

        def start():
            try:
                barrier.wait(timeout=10)  # one start per worker thread
            except threading.BrokenBarrierError:
                pass
            try:
                _warm(limits, modules)
            except Exception:  # noqa: BLE001 — the first task reports it
                pass
        for _ in range(self.workers):
            self.pool.submit(start)

    def share(self, value):
        return value

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def as_completed(self, futures):
        from concurrent.futures import as_completed

        return as_completed(futures)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.pool.shutdown(wait=False, cancel_futures=True)  # queued tasks are dropped,
            close_sandboxes()  # running notebooks end with their sandboxes,
            self.pool.shutdown(wait=True)  # and their threads return
        else:
            self.pool.shutdown(wait=True)
            close_sandboxes()


class DaskWorkers:
    """An existing Dask distributed cluster: each task runs on a worker (in that worker's warm
    sandbox); a worker that dies has its tasks rerun elsewhere by the scheduler."""

    def __init__(self, address: str, timeout: float = 30) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise SystemExit("--scheduler needs Dask: pip install -e \".[cluster]\" (dask and distributed)") from None
        try:
            self.client = Client(address, timeout=timeout)
        except OSError as error:
            raise SystemExit(f"cannot reach the Dask scheduler at {address}: {error}") from None
        self.workers = max(1, sum(self.client.nthreads().values()))

    def prewarm(self, limits: sandbox.Limits, modules: list[str]) -> None:
        pass  # each Dask worker thread starts its own on its first task, and keeps it between runs

    def share(self, value):
        # in a list: a dict given to scatter itself would be read as {key: data}
        return self.client.scatter([value], broadcast=True, hash=False)[0]

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def as_completed(self, futures):
        from distributed import as_completed

        return as_completed(futures)

    def close(self, cancel: bool = False) -> None:
        self.client.close()


# --- the coordinator: tasks out, results in, the gradebook and the ledger written here --------

def _ledger(course: Course, assignment: str) -> dict[tuple[str, str], dict]:
    entries: dict[tuple[str, str], dict] = {}
    path = course.ledgers / f"{assignment}.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        try:
            entry = json.loads(line)
            entries[(entry["student"], entry["notebook"])] = entry
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a killed run: that notebook is graded again
    return entries


def _task_key(task: dict, reference_key: str, limits: sandbox.Limits) -> str:
    """What a ledger entry is valid for: the same submission, reference and caps."""
    body = json.dumps([CACHE_VERSION, task, reference_key, asdict(limits)], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def grade(root: Path, assignment: str, students: list[str] | None = None,
          limits: sandbox.Limits = sandbox.Limits(), refresh_reference: bool = False,
          report: Path | None = None, echo=None, notebooks: list[str] | None = None,
          workers: int | None = None, scheduler: str | None = None, force: bool = False,
          progress: bool | None = None) -> list[Row]:
    """Grade every (or the named) student's submission of ``assignment`` (every notebook, or the
    named ones) on ``workers`` local workers (default: the number of cores) or on the Dask cluster
    at ``scheduler``; notebooks already graded from the same submission are skipped unless
    ``force``. Return the report's rows, in (student, notebook) order."""
    from tqdm.auto import tqdm

    if not Path(root).is_dir():
        raise SystemExit(f"no course directory at {root}")
    if workers is not None and workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {workers}")
    if scheduler is None:
        sandbox.check_features()
    sandbox.remove_stale_cgroups()
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
    sources = {name: nbformat.read(str(course.source(assignment) / f"{name}.ipynb"), as_version=4)
               for name in notebooks}
    modules = imported_modules(sources.values())
    runner = DaskWorkers(scheduler) if scheduler else LocalWorkers(workers or _default_workers())
    rows: dict[tuple[str, str], Row] = {}
    bar = None
    try:
        icells = {name: gradebook.instructor_cells(course.db_url, assignment, name) for name in notebooks}
        # the reference solutions' records (cached until solutions/, d2lite or torch change)
        references, missing = {}, {}
        for name in notebooks:
            with _ast_lock:
                job, key, path = reference_job(course, assignment, name, sources[name], icells[name])
            references[name] = None if refresh_reference else cached_reference(path, key)
            if references[name] is None:
                missing[name] = (job, key, path)
        ledger = {} if force else _ledger(course, assignment)
        graded = gradebook.graded_notebooks(course.db_url, assignment)
        tasks = []
        for student in students:
            for name in notebooks:
                task = read_task(course, assignment, student, name)
                key = _task_key(task, (references[name] or {}).get("key") or missing[name][1], limits)
                entry = ledger.get((student, name))
                if entry is not None and entry.get("key") == key and (student, name) in graded \
                        and (course.autograded(student, assignment) / f"{name}.ipynb").is_file():
                    rows[(student, name)] = Row(**entry["row"])
                    continue
                tasks.append((task, key))
        if missing or tasks:
            runner.prewarm(limits, modules)
        pending = {runner.submit(execute_job, job, limits, modules): (name, job, key, path)
                   for name, (job, key, path) in missing.items()}
        for future in runner.as_completed(list(pending)):
            name, job, key, path = pending[future]
            with _ast_lock:
                references[name] = store_reference(name, sources[name], icells[name], job, key, path,
                                                   future.result())
        local = {name: {"source": nbformat.writes(sources[name]), "icells": icells[name],
                        "reference": references[name], "modules": modules} for name in notebooks}
        contexts = {name: runner.share(local[name]) for name in notebooks}
        futures = {}
        skipped = len(rows)
        write = echo or (lambda line: tqdm.write(line))
        if skipped:
            write(f"{skipped} notebook(s) already graded from the same submission: skipped (--force grades them again)")
        for task, key in tasks:
            futures[runner.submit(grade_task, task, contexts[task["notebook"]], limits)] = (task, key)
        bar = tqdm(total=len(tasks), unit="notebook", desc=f"grading {assignment}", dynamic_ncols=True,
                   disable=None if progress is None else not progress)  # None: shown on a terminal only
        failures = 0
        stamps: dict[str, str | None] = {}  # student -> the timestamp copy_files found
        course.ledgers.mkdir(parents=True, exist_ok=True)
        with open(course.ledgers / f"{assignment}.jsonl", "a") as ledger_file:
            for future in runner.as_completed(list(futures)):
                task, key = futures.pop(future)
                student, name = task["student"], task["notebook"]
                try:
                    result = future.result()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except Exception as error:  # noqa: BLE001 — one notebook's failure never stops the batch
                    with _ast_lock:
                        result = _failed_result(task, local[name],
                                                f"internal error, graded 0: {type(error).__name__}: {error}")
                row = Row(**result["row"])
                try:
                    nb = nbformat.reads(result["autograded"], as_version=4)
                    autograded = course.autograded(student, assignment)
                    if student not in stamps:  # a submission's other files: once, not per notebook
                        stamps[student] = gradebook.copy_files(
                            course.submitted(student, assignment), autograded, course.source(assignment),
                            list(course.dir.ignore))
                    gradebook.save(course.db_url, assignment, student, name, nb, autograded, stamps[student])
                except Exception as error:  # noqa: BLE001
                    row.reasons.append(f"and the gradebook could not be written: {type(error).__name__}: {error}")
                else:
                    if not result.get("failed"):  # an internal error is graded 0 now and tried again next run
                        ledger_file.write(json.dumps({"student": student, "notebook": name, "key": key,
                                                      "row": asdict(row)}) + "\n")
                        ledger_file.flush()
                rows[(student, name)] = row
                failures += row.score < row.max_score
                bar.update()
                bar.set_postfix_str(f"{failures} lost points", refresh=False)
                write(f"{student}/{name}: {row.score:g}/{row.max_score:g} in {row.seconds:.1f} s"
                      + (f" — {row.reason[:200]}" if row.reasons else ""))
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        if bar is not None:
            bar.close()
        runner.close(cancel=sys.exc_info()[0] is not None)
    if interrupted:
        raise SystemExit(f"interrupted: {len(rows)} notebook(s) graded and saved; run the same command again "
                         "to grade the rest")
    ordered = [rows[(s, n)] for s in students for n in notebooks if (s, n) in rows]
    path = write_csv(ordered, report or course.root / "reports" / f"{assignment}.csv")
    (echo or print)("\n" + format_table(ordered) + f"\n\nreport written to {path}")
    return ordered
