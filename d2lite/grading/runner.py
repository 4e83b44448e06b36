"""`d2lite grade`: composes the steps, as nbgrader's converters/autograde.py composes its preprocessors.

submitted/ -> course.read_task (here) -> [on a worker] rebuild -> policy -> split -> sandbox (the
student's oracle and the checker) -> judge -> [here] gradebook, autograded/, ledger, report.

A task carries one submitted notebook (its JSON and the submission's own files) and the notebook's
context (the instructor's copy); it comes back as data only: the report line and the autograded
notebook. This process is the single writer of the gradebook and of the ledger.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import nbformat

from . import gradebook, judge, ledger, policy, pool, sandbox, split
from .course import Course, imported_modules, read_task
from .errors import GradingError
from .rebuild import Rebuilt, nbgrader_meta, rebuild
from .report import Row, format_table, write_csv

__all__ = ["grade", "grade_task", "GradingError", "NotGraded"]

REFERENCE_VERSION = 4


def structure_names(source_nb, test_sources: list[str]) -> set[str]:
    """The names the notebook's does-the-work-itself tests forbid, read from their forbid_calls(...)."""
    from d2lite.checks import BATCH_NORM_LIBRARY_FUNCTIONS

    from .course import code_trees

    constants: dict[str, tuple] = {}
    for tree in code_trees([source_nb]):
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


def _stopped(outcome: dict | None, limits: sandbox.Limits) -> str:
    """Why a notebook's remaining tests did not run, in words."""
    if outcome is None:
        return "the notebook was not run"
    if outcome["notes"]:
        return "; ".join(outcome["notes"])
    killed = outcome["killed"]
    if killed:
        return {"timeout": f"the notebook was stopped after {limits.wall:g} s (wall-clock cap)",
                "memory": f"the notebook was stopped at the memory cap ({limits.memory / 2**30:g} GiB)",
                "output": f"the notebook was stopped: more than {limits.output >> 20} MiB of output",
                "records": "the notebook was stopped: too many records"}[killed]
    return f"the notebook stopped early (the student's process ended with status {outcome['returncode']})"


# CPython 3.11 keeps the AST recursion depth per interpreter, not per thread: ast.parse/compile in
# two threads at once can raise "SystemError: AST constructor recursion depth mismatch". Worker
# threads hold this lock for everything but the sandbox run.
_ast_lock = threading.Lock()


def grade_task(task: dict, context: dict, limits: sandbox.Limits) -> dict:
    """Grade one submitted notebook (runs on a worker: locally or on a Dask worker). Returns data only:
    ``row`` (the report line) and ``autograded`` (the notebook, JSON)."""
    with _ast_lock:
        return _grade_task(task, context, limits)


def _execute_unlocked(job: dict, limits: sandbox.Limits, modules: list[str]) -> dict:
    _ast_lock.release()
    try:
        return pool.execute(job, limits, modules)
    finally:
        _ast_lock.acquire()


def _runs_ranks(source: str) -> bool:
    """Whether a test cell calls one of d2lite's functions that run code on several processes."""
    from ..distributed import STUDENT_SIDE

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    return any((isinstance(n, ast.Attribute) and n.attr in STUDENT_SIDE)
               or (isinstance(n, ast.Name) and n.id in STUDENT_SIDE) for n in ast.walk(tree))


def _grade_task(task: dict, context: dict, limits: sandbox.Limits) -> dict:
    source_nb = nbformat.reads(context["source"], as_version=4)
    reasons: list[str] = []
    student_nb = None
    if task["error"] is not None:
        reasons = [task["error"]]
    else:
        student_nb = nbformat.from_dict(json.loads(task["notebook_json"]))  # read_submission validated it
    rebuilt = rebuild(source_nb, student_nb, context["icells"])
    reasons += rebuilt.notes[:5]
    tests = [i for i, role in enumerate(rebuilt.roles) if role == "test"]
    # structural: the checks that rely on library code running in the student's process, where the
    # source policy's findings of reaching into the runtime cost them: the library block
    # (forbid_calls) and d2lite's functions that run the student's code on several processes
    structural = {i for i in tests if "forbid_calls(" in rebuilt.nb.cells[i].source
                  or _runs_ranks(rebuilt.nb.cells[i].source)}
    used = {i: split.names_used(rebuilt.nb.cells[i].source) for i in structural}
    ends, outcome = {}, None
    if student_nb is None:
        verdicts = {i: judge.Verdict(False, f"0 points: {reasons[0]}", reasons[0]) for i in tests}
    else:
        structure = set(context["structure"])
        own_modules = {Path(p).stem for p in task["files"] if p.endswith(".py") and "/" not in p}
        flags: list[policy.Flag] = []
        concerns: dict[int, list] = {}
        for i, (cell, role) in enumerate(zip(rebuilt.nb.cells, rebuilt.roles)):
            if cell.cell_type == "code" and role in ("solution", "student"):
                label = nbgrader_meta(cell).get("grade_id") or f"cell {i + 1} (your own)"
                found = policy.check_cell(cell.source, label, structure=structure, own_modules=own_modules)
                # library normalization counts in the graded answers only, not in scratch cells
                found = [f for f in found if f.kind != "structure" or role == "solution"]
                flags += found
                defined = context["answers_by_cell"].get(nbgrader_meta(cell).get("grade_id"), [])
                for t in structural:
                    for f in found:
                        # the runtime (machinery) concerns every structural test; library use in an
                        # answer, the structural tests of what that answer defines
                        if f.kind == "machinery" or (f.kind == "structure" and set(defined) & used[t]):
                            concerns.setdefault(t, []).append(f)
        for path, data in sorted(task["files"].items()):  # the submission's own modules run in its process too
            if path.endswith(".py"):
                try:
                    text = base64.b64decode(data).decode("utf-8", errors="replace")
                except ValueError:
                    continue
                # a module of the submission's own: reaching the runtime or naming a library normalization
                # there concerns every structural test (its functions may serve any answer)
                found = [f for f in policy.check_cell(text, f"{path} (your file)", structure=structure,
                                                      own_modules=own_modules) if f.kind != "syntax"]
                flags += found
                for t in structural:
                    concerns.setdefault(t, []).extend(found)
        job = split.checker_job(rebuilt, context["answers"], task["files"], limits.wall)
        result = _execute_unlocked(job, limits, context["modules"])
        outcome = result["outcome"]
        ends, notes = judge.cell_events(judge.read_records(result["records"]))
        verdicts = judge.judge(rebuilt, ends, concerns, _stopped(outcome, limits))
        reasons += [f"flagged ({f.kind}): {f}" for f in flags][:3]
        reasons += notes[:2]
        if outcome["notes"] or outcome["killed"]:
            reasons.append(_stopped(outcome, limits))
        elif job["cells"] and ends.get(job["cells"][-1]["index"]) is None:
            reasons.append(_stopped(outcome, limits))
        if outcome["leftover"]:
            reasons.append(f"{outcome['leftover']} process(es) still running at the end were killed")
    judge.compose(rebuilt, ends, verdicts)
    for i in tests:
        if not verdicts[i].passed and verdicts[i].reason != "did not run" and student_nb is not None:
            gid = nbgrader_meta(rebuilt.nb.cells[i])["grade_id"]
            reasons.append(f"{gid}: {verdicts[i].message.splitlines()[0][:160]}")
    score, most = judge.points(rebuilt, verdicts)
    row = Row(task["student"], task["notebook"], score, most, outcome["seconds"] if outcome else 0.0,
              (outcome["peak_memory"] if outcome else 0) / 2**20, reasons)
    return {"row": asdict(row), "autograded": nbformat.writes(rebuilt.nb)}


def _unreached(task: dict, context: dict, message: str) -> dict:
    """A task the grader could not grade (an internal error): its tests left unanswered, with the reason."""
    source_nb = nbformat.reads(context["source"], as_version=4)
    rebuilt = rebuild(source_nb, None, context["icells"])
    verdicts = {i: judge.Verdict(False, message) for i, role in enumerate(rebuilt.roles) if role == "test"}
    judge.compose(rebuilt, {}, verdicts)
    _, most = judge.points(rebuilt, verdicts)
    row = Row(task["student"], task["notebook"], 0.0, most, reasons=[message], graded=False)
    return {"row": asdict(row), "autograded": nbformat.writes(rebuilt.nb), "failed": True}


# --- the reference solution: it must pass every test of its own (checked once, cached) -------

def _reference_key(course: Course, assignment: str, notebook: str, context: dict) -> tuple[str, Path]:
    import torch

    import d2lite
    from .course import own_files

    body = json.dumps([REFERENCE_VERSION, context["source"], context["icells"], own_files(course.source(assignment)),
                       d2lite.__version__, torch.__version__], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest(), course.cache / assignment / f"{notebook}.json"


def _reference_ok(path: Path, key: str) -> bool:
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _check_reference(notebook: str, result: dict, path: Path, key: str) -> None:
    row = Row(**result["row"])
    if row.score < row.max_score or result.get("failed"):
        raise GradingError(f"the reference solution of {notebook} does not pass its own tests in the sandbox "
                           f"({row.score:g}/{row.max_score:g}): {row.reason[:2000]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "score": row.score}))
    os.replace(tmp, path)


def _lost(error: BaseException) -> bool:
    """Whether a cluster lost the task (not the grading of it): a worker died with it, or the
    scheduler cancelled or forgot it."""
    return type(error).__name__ in ("CancelledError", "FutureCancelledError", "KilledWorker", "CommClosedError",
                                    "FutureLost")


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

    if workers is not None and workers < 1:
        raise GradingError(f"--workers must be at least 1, got {workers}")
    if scheduler is None:
        try:
            sandbox.check_features()
        except sandbox.SandboxUnavailable as error:
            raise GradingError(str(error)) from None
    sandbox.remove_stale_cgroups()
    course = Course(root)
    if course.db_url.startswith("sqlite:///") and not Path(course.db_url.removeprefix("sqlite:///")).is_file():
        raise GradingError(f"no gradebook at {course.db_url.removeprefix('sqlite:///')}: run `nbgrader "
                           f"generate_assignment {assignment}` in the course directory first")
    known_notebooks = gradebook.notebook_names(course.db_url, assignment)
    unknown = [n for n in (notebooks or []) if n not in known_notebooks]
    if unknown:
        raise GradingError(f"{assignment!r} has no notebook {', '.join(unknown)}; it has {', '.join(known_notebooks)}")
    notebooks = notebooks or known_notebooks
    known = course.students(assignment)
    if students:
        unknown = [s for s in students if s not in known]
        if unknown:
            raise GradingError(f"no submission of {assignment!r} for {', '.join(unknown)} under "
                               f"{course.dir.submitted_directory}/")
    students = students or known
    sources = {name: nbformat.read(str(course.source(assignment) / f"{name}.ipynb"), as_version=4)
               for name in notebooks}
    modules = imported_modules(sources.values())
    runner = pool.DaskWorkers(scheduler) if scheduler else pool.LocalWorkers(workers or _default_workers())
    rows: dict[tuple[str, str], Row] = {}
    bar = None
    try:
        local = {}
        for name in notebooks:
            icells = gradebook.instructor_cells(course.db_url, assignment, name)
            source_nb = sources[name]
            rebuilt = rebuild(source_nb, None, icells)
            tests = [rebuilt.nb.cells[i].source for i, r in enumerate(rebuilt.roles) if r == "test"]
            local[name] = {"source": nbformat.writes(source_nb), "icells": icells, "modules": modules,
                           "answers": split.answer_names(source_nb),
                           "answers_by_cell": {k: sorted(v) for k, v in split.answers_by_cell(source_nb).items()},
                           "structure": sorted(structure_names(source_nb, tests))}
        # the reference solutions must pass their own tests (checked once, until they change)
        references, missing = {}, {}
        for name in notebooks:
            key, path = _reference_key(course, assignment, name, local[name])
            references[name] = key
            if refresh_reference or not _reference_ok(path, key):
                missing[name] = (key, path)
        ledger_path = course.ledgers / f"{assignment}.jsonl"
        entries = {} if force else ledger.read(ledger_path)
        graded = gradebook.graded_notebooks(course.db_url, assignment)
        tasks = []
        for student in students:
            for name in notebooks:
                task = read_task(course, assignment, student, name)
                key = ledger.task_key(task, references[name], limits)
                entry = entries.get((student, name))
                if entry is not None and entry.get("key") == key and (student, name) in graded \
                        and (course.autograded(student, assignment) / f"{name}.ipynb").is_file():
                    rows[(student, name)] = Row(**entry["row"])
                    continue
                tasks.append((task, key))
        if missing or tasks:
            runner.prewarm(limits, modules)
        contexts = {name: runner.share(local[name]) for name in notebooks}
        pending = {}
        for name, (key, path) in missing.items():
            task = {"student": "(reference)", "notebook": name, "error": None, "files": {},
                    "notebook_json": json.dumps(sources[name])}
            pending[runner.submit(grade_task, task, contexts[name], limits)] = (name, key, path)
        reference_tries: dict[str, int] = {}
        while pending:
            round_, pending = pending, {}
            for future in runner.as_completed(list(round_)):
                name, key, path = round_[future]
                try:
                    result = future.result()
                except Exception as error:  # noqa: BLE001
                    if not _lost(error) or reference_tries.get(name, 0) >= 3:
                        raise GradingError(f"the reference solution of {name} could not be checked: "
                                           f"{type(error).__name__}: {error}") from None
                    reference_tries[name] = reference_tries.get(name, 0) + 1
                    task = {"student": "(reference)", "notebook": name, "error": None, "files": {},
                            "notebook_json": json.dumps(sources[name])}
                    pending[runner.submit(grade_task, task, contexts[name], limits)] = (name, key, path)
                    continue
                _check_reference(name, result, path, key)
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
        ungraded: list[Row] = []
        stamps: dict[str, str | None] = {}  # student -> the timestamp copy_files found
        book = ledger.Ledger(ledger_path)
        tries: dict[tuple[str, str], int] = {}
        try:
            while futures:
                round_, futures = futures, {}
                for future in runner.as_completed(list(round_)):
                    task, key = round_.pop(future)
                    student, name = task["student"], task["notebook"]
                    try:
                        result = future.result()
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except Exception as error:  # noqa: BLE001 — one notebook's failure never stops the batch
                        if _lost(error) and tries.get((student, name), 0) < 3:
                            # a cluster lost the task (a worker died with it): it runs again, once more at most 3 times
                            tries[(student, name)] = tries.get((student, name), 0) + 1
                            futures[runner.submit(grade_task, task, contexts[name], limits)] = (task, key)
                            continue
                        result = _unreached(task, local[name], f"not graded, internal error: {type(error).__name__}: {error}")
                    row = Row(**result["row"])
                    if result.get("failed"):
                        # the grader's failure, not the student's: no grade goes to the gradebook, no
                        # autograded copy is written, and the next run grades it again
                        rows[(student, name)] = row
                        ungraded.append(row)
                        bar.update()
                        write(f"{student}/{name}: NOT GRADED — {row.reason[:300]}")
                        continue
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
                        book.add(student, name, key, row)
                    rows[(student, name)] = row
                    failures += row.score < row.max_score
                    bar.update()
                    bar.set_postfix_str(f"{failures} lost points", refresh=False)
                    write(f"{student}/{name}: {row.score:g}/{row.max_score:g} in {row.seconds:.1f} s"
                          + (f" — {row.reason[:200]}" if row.reasons else ""))
        finally:
            book.close()
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        if bar is not None:
            bar.close()
        runner.close(cancel=sys.exc_info()[0] is not None)
    if interrupted:
        raise GradingError(f"interrupted: {len(rows)} notebook(s) graded and saved; run the same command again "
                           "to grade the rest")
    ordered = [rows[(s, n)] for s in students for n in notebooks if (s, n) in rows]
    path = write_csv(ordered, report or course.root / "reports" / f"{assignment}.csv")
    (echo or print)("\n" + format_table(ordered) + f"\n\nreport written to {path}")
    ungraded = [r for r in ordered if not r.graded]
    if ungraded:
        raise NotGraded(ungraded, ordered)
    return ordered


class NotGraded(GradingError):
    """Some notebooks could not be graded (the grader's failure: a lost worker, an error of its own):
    they are left out of the gradebook and listed; ``rows`` holds the whole run's report rows."""

    def __init__(self, ungraded: list[Row], rows: list[Row]) -> None:
        self.ungraded, self.rows = ungraded, rows
        lines = [f"  {r.student}/{r.notebook}: {r.reason[:300]}" for r in ungraded[:20]]
        if len(ungraded) > 20:
            lines.append(f"  … and {len(ungraded) - 20} more (see the report)")
        super().__init__(f"{len(ungraded)} notebook(s) NOT GRADED (internal errors; nothing of them is in the "
                         f"gradebook; the other {len(rows) - len(ungraded)} are): run the same command again "
                         "to grade them\n" + "\n".join(lines))
