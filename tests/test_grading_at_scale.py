"""d2lite grade at scale: parallel workers, a real Dask cluster (LocalCluster, and a `dask scheduler` with
`dask worker` processes over loopback, one of them killed mid-run), interrupt and resume, and a warm
start that leaks nothing from one student to the next."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from notebook_utils import ASSIGNMENT, SOLUTIONS, nbgrader_env, new_course, read
from test_trusted_grading import CASES, CORRECT, FULL, MISSING, NB, _with

from d2lite.grading import sandbox
from d2lite.grading.runner import grade

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"sandbox unavailable: {MISSING}")

LIMITS = sandbox.Limits(memory=2 << 30, wall=15, cpu=60, processes=64, output=4 << 20)
FAST = "06_api"  # the quickest notebook: a second notebook per student at little cost
# a mixed class: honest, mistaken, hostile (each kind's exact score is asserted in test_trusted_grading)
KINDS = ["honest", "mistake_eps_forgotten", "mistake_wrong_axes", "mistake_batch_stats_in_eval",
         "patch_d2lite_assert_close", "corrupt_json", "os_exit", "infinite_loop", "memory_bomb",
         "orphan_processes", "library_in_default_argument"]
LEAK = ("torch.set_grad_enabled(False)\ntorch.set_default_dtype(torch.float64)\ntorch.manual_seed(1234)\n"
        "GLOBAL_LEAK = 42\nopen('leak_module.py', 'w').write('LEAKED = True')\n"
        "open('/tmp/leak.txt', 'w').write('x')\nos.makedirs('/dev/shm/leak', exist_ok=True)\n"
        "os.makedirs('locked/a/b', exist_ok=True)\nos.chmod('locked/a/b', 0)\nos.chmod('locked/a', 0)\n")
# a tree too deep for the wipe: the server it ran in is replaced before the next notebook
DEEP = "import os\nfor _ in range(1300):\n    os.mkdir('d')\n    os.chdir('d')\nos.chdir('/home/student')\n"
OBSERVE = ("import os\ntry:\n    GLOBAL_LEAK\n    leaked_global = True\nexcept NameError:\n    leaked_global = False\n"
           "print('OBSERVED', sorted(os.listdir('.')), os.listdir('/tmp'), os.listdir('/dev/shm'), "
           "torch.get_default_dtype(), torch.is_grad_enabled(), leaked_global, round(torch.rand(1).item(), 6))\n"
           "try:\n    import leak_module\n    print('IMPORTED')\nexcept ImportError:\n    print('NOT IMPORTED')\n")


def _submit(root: Path, student: str, make, fast: bool = True) -> None:
    folder = root / "submitted" / student / ASSIGNMENT
    folder.mkdir(parents=True)
    path = folder / f"{NB}.ipynb"
    if isinstance(make, bytes):
        path.write_bytes(make)
    else:
        nbformat.write(make(), str(path))
    if fast:  # the reference's answers, each with a comment: run, not reused
        nb = read(SOLUTIONS / f"{FAST}.ipynb")
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
                cell.source += "\n# mine"
        nbformat.write(nb, str(folder / f"{FAST}.ipynb"))


def _class(root: Path) -> list[str]:
    for kind in KINDS:
        _submit(root, kind, CASES[kind][0])
    return KINDS


def _gradebook(root: Path) -> dict:
    """Every auto score and comment in the gradebook, and how many submissions each student has."""
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        submissions = gb.find_assignment(ASSIGNMENT).submissions
        counts = {}
        for s in submissions:
            counts[s.student.id] = counts.get(s.student.id, 0) + 1
        scores = {(s.student.id, nb.name, g.name): (g.auto_score, g.max_score)
                  for s in submissions for nb in s.notebooks for g in nb.grades}
        comments = {(s.student.id, nb.name, c.name): c.auto_comment
                    for s in submissions for nb in s.notebooks for c in nb.comments}
    return {"counts": counts, "scores": scores, "comments": comments}


def _fresh_course(tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    new_course(root, tmp_path_factory.mktemp(f"{name}-exchange"))
    _class(root)
    return root


@pytest.fixture(scope="module")
def env():
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", nbgrader_env()["PATH"])
    yield
    mp.undo()


@pytest.fixture(scope="module")
def serial(tmp_path_factory, env):
    root = _fresh_course(tmp_path_factory, "serial")
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], workers=1, echo=lambda *a: None)
    return root, rows, _gradebook(root)


def test_serial_run_gives_each_kind_its_score(serial):
    root, rows, book = serial
    by = {(r.student, r.notebook): r for r in rows}
    assert len(rows) == len(KINDS) * 2
    for student in KINDS:
        assert by[(student, NB)].score == CASES[student][1], (student, by[(student, NB)].reason)
        assert by[(student, FAST)].score == 13, (student, by[(student, FAST)].reason)
    assert book["counts"] == {s: 1 for s in KINDS}


def test_parallel_workers_give_the_same_gradebook_as_serial(serial, tmp_path_factory, env):
    root = _fresh_course(tmp_path_factory, "parallel")
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], workers=2, echo=lambda *a: None)
    assert [(r.student, r.notebook, r.score) for r in rows] == [(r.student, r.notebook, r.score) for r in serial[1]]
    assert _gradebook(root) == serial[2]
    leftover = subprocess.run(["pgrep", "-f", "sleep 314160"], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes a submission started are still running: {leftover}"


def test_a_dask_local_cluster_gives_the_same_gradebook(serial, tmp_path_factory, env):
    distributed = pytest.importorskip("distributed")
    root = _fresh_course(tmp_path_factory, "localcluster")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster:
        rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], scheduler=cluster.scheduler_address,
                     echo=lambda *a: None)
    assert [(r.student, r.notebook, r.score) for r in rows] == [(r.student, r.notebook, r.score) for r in serial[1]]
    assert _gradebook(root) == serial[2]


def _ledger_lines(root: Path) -> int:
    try:
        return len((root / ".d2lite" / "graded" / f"{ASSIGNMENT}.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killing_a_dask_worker_mid_run_loses_nothing(serial, tmp_path_factory, env):
    pytest.importorskip("distributed")
    root = _fresh_course(tmp_path_factory, "daskkill")
    bindir = Path(sys.executable).parent
    scheduler_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(scheduler_file.exists, 60, "the scheduler")
        for _ in range(3):  # three workers, one of them killed: what issue 18 measured (every student 0)
            procs.append(subprocess.Popen([str(bindir / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                           "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        from distributed import Client
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(3, timeout=120)
        result = {}
        thread = threading.Thread(target=lambda: result.update(rows=grade(
            root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], scheduler=address, echo=lambda *a: None)))
        thread.start()
        _wait_for(lambda: _ledger_lines(root) >= 3 or not thread.is_alive(), 600, "the first results")
        victim = procs[1]
        os.killpg(victim.pid, signal.SIGKILL)  # a worker dies with tasks in flight (its process group: it
        # and the sandboxes it started): the scheduler reruns them on the others
        victim.wait()
        thread.join(timeout=900)
        assert not thread.is_alive(), "the run did not finish after a worker died"
        rows = result["rows"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert _ledger_lines(root) == len(KINDS) * 2, "a notebook was graded twice or not at all"
    assert [(r.student, r.notebook, r.score) for r in rows] == [(r.student, r.notebook, r.score) for r in serial[1]]
    assert _gradebook(root) == serial[2]


def _cli(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "d2lite"), "grade", ASSIGNMENT, "--course", str(root),
                             "--no-progress", "--notebook", NB, "--notebook", FAST, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **nbgrader_env()}, preexec_fn=_default_sigint)


def _default_sigint():
    # A shell that starts a job in the background (`cmd &` without job control, as CI runners
    # may) makes it ignore SIGINT, and the ignoring is inherited: the Ctrl-C sent below would do
    # nothing. Give the CLI the default disposition back (Python then raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


RESUMED = ["honest", "mistake_eps_forgotten", "mistake_wrong_axes", "patch_d2lite_assert_close", "corrupt_json",
           "orphan_processes", "library_in_default_argument"]


def test_interrupted_and_killed_runs_resume_without_double_or_missing_entries(serial, tmp_path_factory, env):
    root = tmp_path_factory.mktemp("resume")
    new_course(root, tmp_path_factory.mktemp("resume-exchange"))
    for kind in RESUMED:
        _submit(root, kind, CASES[kind][0])
    total = len(RESUMED) * 2
    caps = ["--timeout", "15", "--memory", "2G", "--cpu", "60", "--workers", "1"]
    # 1: Ctrl-C (SIGINT) after two notebooks
    run = _cli(root, *caps)
    _wait_for(lambda: _ledger_lines(root) >= 2 or run.poll() is not None, 600, "two graded notebooks")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "interrupted" in err, (run.returncode, err[-2000:])
    first = _ledger_lines(root)
    assert 2 <= first < total
    # 2: the coordinator killed outright (SIGKILL) after a few more
    run = _cli(root, *caps)
    _wait_for(lambda: _ledger_lines(root) >= first + 2 or run.poll() is not None, 600, "two more")
    run.kill()
    run.communicate(timeout=60)
    second = _ledger_lines(root)
    assert first + 2 <= second < total
    # 3: to the end, grading only what is not yet graded
    run = _cli(root, *caps)
    out, err = run.communicate(timeout=1800)
    assert run.returncode == 0, err[-3000:]
    assert f"{second} notebook(s) already graded" in out + err
    graded_now = len(re.findall(r"^[\w-]+/[\w-]+: [\d.]+/[\d.]+ in ", out, flags=re.M))
    assert graded_now == total - second, out[-3000:]
    book = _gradebook(root)
    assert book["counts"] == {s: 1 for s in RESUMED}
    assert book["scores"] == {k: v for k, v in serial[2]["scores"].items() if k[0] in RESUMED}
    leftover = [p for p in Path("/sys/fs/cgroup/pids").glob("d2lite-*") if not (p / "cgroup.procs").read_text().split()
                and not Path(f"/proc/{p.name.split('-')[1]}").exists()]
    assert leftover == [], f"cgroups of killed runs were not cleaned up: {leftover}"
    # 4: nothing left to do; --force grades one student again, without a second entry
    run = _cli(root, *caps, "--student", "honest", "--force")
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert _gradebook(root)["counts"] == {s: 1 for s in RESUMED}


def test_the_warm_start_leaks_nothing_to_the_next_student(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("leak")
    new_course(root, tmp_path_factory.mktemp("leak-exchange"))
    _submit(root, "a_fresh", lambda: _with(CORRECT, suffix="\n" + OBSERVE), fast=False)
    _submit(root, "b_leaker", lambda: _with(CORRECT, prefix="import os\n", suffix="\n" + LEAK), fast=False)
    _submit(root, "c_observer", lambda: _with(CORRECT, suffix="\n" + OBSERVE), fast=False)
    _submit(root, "d_deep", lambda: _with(CORRECT, suffix="\n" + DEEP), fast=False)
    _submit(root, "e_observer", lambda: _with(CORRECT, suffix="\n" + OBSERVE), fast=False)
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB], workers=1, echo=lambda *a: None)
    by = {r.student: r for r in rows}
    for student in ("a_fresh", "c_observer", "d_deep", "e_observer"):
        assert by[student].score == FULL, (student, by[student].reason)
    seen = {}
    for student in ("a_fresh", "c_observer", "e_observer"):
        nb = nbformat.read(str(root / "autograded" / student / ASSIGNMENT / f"{NB}.ipynb"), 4)
        printed = "".join(str(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
        seen[student] = next(line for line in printed.splitlines() if line.startswith("OBSERVED"))
        assert "NOT IMPORTED" in printed
    # what the observer saw after the leaker is what a student saw before it: a fresh interpreter
    assert seen["c_observer"] == seen["a_fresh"] == seen["e_observer"]
    assert "torch.float32 True False" in seen["c_observer"] and "leak" not in seen["c_observer"]



def test_an_internal_error_is_never_a_grade(tmp_path_factory, env, monkeypatch):
    """A notebook the grader fails on (here: its task raises on the worker) is not graded: nothing of
    it reaches the gradebook or autograded/, the report lists it as NOT GRADED, the run ends with an
    error naming it (the CLI exits non-zero), and the next run grades it."""
    from d2lite.grading import runner

    root = tmp_path_factory.mktemp("internal")
    new_course(root, tmp_path_factory.mktemp("internal-exchange"))
    _submit(root, "honest", CASES["honest"][0])
    _submit(root, "victim", CASES["mistake_eps_forgotten"][0])
    real = runner.grade_task

    def failing(task, context, limits):
        if task["student"] == "victim" and task["notebook"] == NB:
            raise RuntimeError("the grader broke here")
        return real(task, context, limits)

    monkeypatch.setattr(runner, "grade_task", failing)
    report = root / "reports" / "run1.csv"
    with pytest.raises(runner.NotGraded) as caught:
        grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], report=report, echo=lambda *a: None)
    message = str(caught.value)
    assert "1 notebook(s) NOT GRADED" in message and f"victim/{NB}" in message and "the grader broke here" in message
    assert [(r.student, r.notebook) for r in caught.value.ungraded] == [("victim", NB)]
    book = _gradebook(root)
    # nbgrader lists every notebook of a submission; the one not graded has no auto score
    victim_nb = [score for (s, n, _), (score, _) in book["scores"].items() if s == "victim" and n == NB]
    assert all(score is None for score in victim_nb), f"an internal error reached the gradebook: {victim_nb}"
    assert any(score is not None for (s, n, _), (score, _) in book["scores"].items() if s == "victim" and n == FAST)
    assert not (root / "autograded" / "victim" / ASSIGNMENT / f"{NB}.ipynb").exists()
    import csv
    lines = {(r["student"], r["notebook"]): r for r in csv.DictReader(report.open())}
    assert lines[("victim", NB)]["graded"] == "False" and lines[("victim", NB)]["score"] == ""
    assert lines[("honest", NB)]["graded"] == "True"

    monkeypatch.setattr(runner, "grade_task", real)
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB, FAST], echo=lambda *a: None)
    victim = {r.notebook: r for r in rows if r.student == "victim"}[NB]
    assert victim.graded and victim.score == CASES["mistake_eps_forgotten"][1], victim
    after = _gradebook(root)["scores"]
    assert sum(score or 0 for (s, n, _), (score, _) in after.items() if s == "victim" and n == NB) \
        == CASES["mistake_eps_forgotten"][1]
