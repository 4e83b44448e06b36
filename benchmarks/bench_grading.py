"""Grading a class, side by side in one run: `nbgrader autograde` (one complete submission) vs
`d2lite grade --workers 1`, `--workers 2`, and a local Dask cluster (a `dask scheduler` and two
`dask worker` processes over 127.0.0.1, started here).

The class is synthetic: the ten reference notebooks (each answer with a comment of its own, so
that it runs rather than reusing the reference's records), and one student in six for each of
the five mistakes of tests/test_grading.py in 00_from_scratch.

    .venv/bin/python benchmarks/bench_grading.py [--students 20] [--serial-students 8] [--out benchmarks/results]
        [--baseline GIT_REF]
    (as root: the sandbox; D2LITE_DATA pointing at the data set)

--baseline grades the same class, in the same run, with the grader of an earlier commit (its
d2lite and its solutions, from a `git worktree`; its d2lite bind-mounted over this one in a mount
namespace of its own), so that old and new stand side by side.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSIGNMENT = "batch_norm"


def _mistakes() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_grading import MISTAKES

    return {name: source for name, (source, _, _) in MISTAKES.items()}


def _course(tmp: Path, env: dict, students: int, source: Path = ROOT, name: str = "course") -> tuple[Path, list[str]]:
    import nbformat

    root = tmp / name
    shutil.copytree(source / "solutions", root / "solutions")
    shutil.copy(source / "nbgrader_config.py", root)
    subprocess.run([str(BIN / "nbgrader"), "generate_assignment", ASSIGNMENT, "--force"],
                   cwd=root, check=True, capture_output=True, env=env)
    mistakes = list(_mistakes().items())
    names = []
    for i in range(students + 1):  # student 0 is graded by nbgrader, the others by d2lite grade
        k = (i - 1) % 6  # s001 honest, then one student for each mistake, and again
        kind = "honest" if i == 0 or k == 0 else mistakes[k - 1][0]
        name = "nbgrader_student" if i == 0 else f"s{i:03d}_{kind}"
        folder = root / "submitted" / name / ASSIGNMENT
        folder.mkdir(parents=True)
        for path in sorted((root / "solutions" / ASSIGNMENT).glob("*.ipynb")):
            nb = nbformat.read(str(path), as_version=4)
            for cell in nb.cells:
                meta = cell.metadata.get("nbgrader", {})
                if cell.cell_type == "code" and meta.get("solution"):
                    if kind != "honest" and meta.get("grade_id") == "batch_norm_impl":
                        cell.source = dict(mistakes)[kind]
                    cell.source += f"\n# {name}'s answer"
            nbformat.write(nb, str(folder / path.name))
        if i:
            names.append(name)
    return root, names


def _run(label: str, cmd: list[str], root: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"{label} failed")
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def _report(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _scores(rows: list[dict]) -> dict:
    return {(r["student"], r["notebook"]): float(r["score"]) for r in rows}


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _dask_cluster(env: dict, tmp: Path):
    scheduler_file = tmp / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the Dask scheduler did not start")
        time.sleep(0.2)
    for _ in range(2):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    address = json.loads(scheduler_file.read_text())["address"]
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
    return address, procs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, default=20, help="the class graded with --workers 2 and on Dask")
    parser.add_argument("--serial-students", type=int, default=8, help="how many of them --workers 1 grades")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-dask", dest="dask", action="store_false", help="skip the Dask runs")
    parser.add_argument("--baseline", default=None, metavar="GIT_REF",
                        help="also grade the class with the grader of this commit, side by side")
    args = parser.parse_args(argv)
    env = dict(os.environ, PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        grade = [str(BIN / "d2lite"), "grade", ASSIGNMENT, "--no-progress"]
        if args.baseline:
            old = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline], cwd=ROOT, check=True,
                           capture_output=True)
            try:
                old_root, old_students = _course(Path(tmp), env, args.students, source=old, name="old_course")
                old_env = env
                # the old d2lite where the installed one is, in a mount namespace of its own (as root):
                # the grader and its sandbox import it from there, the checkout is left as it is
                old_grade = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f'mount --bind "{old / "d2lite"}" "{ROOT / "d2lite"}" && exec "$0" "$@"',
                             str(BIN / "d2lite"), "grade", ASSIGNMENT, "--no-progress"]
                _run(f"{args.baseline}: d2lite grade --workers 2, one submission (reference recorded)",
                     [*old_grade, "--student", old_students[0], "--workers", "2"], old_root, old_env)
                old_w2 = _run(f"{args.baseline}: d2lite grade --workers 2, {len(old_students)} submissions",
                              [*old_grade, "--workers", "2", "--force", "--report", "reports/w2.csv"], old_root, old_env)
                old_rows = _report(old_root / "reports/w2.csv")
                baseline = (args.baseline, old_w2, [float(r["seconds"]) for r in old_rows],
                            {(r["student"], r["notebook"]): float(r["score"]) for r in old_rows})
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
        root, students = _course(Path(tmp), env, args.students)
        nbgrader = _run("nbgrader autograde, one submission", [str(BIN / "nbgrader"), "autograde", ASSIGNMENT,
                                                               "--student", "nbgrader_student", "--force"], root, env)
        nb_scores = {}
        from nbgrader.api import Gradebook
        with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
            for nb in gb.find_submission(ASSIGNMENT, "nbgrader_student").notebooks:
                nb_scores[nb.name] = nb.score
        single = [*grade, "--student", students[0], "--workers", "2"]
        cold = _run("d2lite grade --workers 2, one submission, reference records computed", single, root, env)
        warm_single = _run("d2lite grade --workers 2, one submission, cached", [*single, "--force"], root, env)
        serial_students = [a for s in students[: args.serial_students] for a in ("--student", s)]
        w1 = _run(f"d2lite grade --workers 1, {args.serial_students} submissions",
                  [*grade, *serial_students, "--workers", "1", "--force", "--report", "reports/w1.csv"], root, env)
        w2 = _run(f"d2lite grade --workers 2, {len(students)} submissions",
                  [*grade, "--workers", "2", "--force", "--report", "reports/w2.csv"], root, env)
        dask = dask_again = None
        if args.dask:
            address, procs = _dask_cluster(env, Path(tmp))
            try:
                dask = _run(f"d2lite grade on Dask (2 workers), {len(students)} submissions",
                            [*grade, "--scheduler", address, "--force", "--report", "reports/dask.csv"], root, env)
                dask_again = _run("the same on the Dask cluster's warm workers",
                                  [*grade, "--scheduler", address, "--force", "--report", "reports/dask2.csv"], root, env)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=60)
        w1_rows, w2_rows = _report(root / "reports/w1.csv"), _report(root / "reports/w2.csv")
        same_scores = all(_scores(w2_rows)[k] == v for k, v in _scores(w1_rows).items())
        if args.dask:
            same_scores = same_scores and _scores(w2_rows) == _scores(_report(root / "reports/dask.csv")) \
                == _scores(_report(root / "reports/dask2.csv"))
        honest = {r["notebook"]: float(r["score"]) for r in w2_rows if r["student"] == students[0]}
        same_as_nbgrader = honest == nb_scores
        seconds = [float(r["seconds"]) for r in w2_rows]
        peak = max(float(r["peak_mib"]) for r in w2_rows)
        n_nb = len(nb_scores)
    load = os.getloadavg()[0]
    per_w1, per_w2 = w1 / args.serial_students, w2 / len(students)
    lines = [
        "# Grading a class: nbgrader autograde vs d2lite grade, one run", "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average at the end {load:.1f}; `.venv/bin/python benchmarks/bench_grading.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"A synthetic class of {len(students)} complete submissions ({n_nb} notebooks each): the reference "
        "answers with a comment, one student in six for each of the five mistakes of tests/test_grading.py.", "",
        "| grader | submissions | wall seconds | seconds per submission | submissions per hour |",
        "|---|---|---|---|---|",
        f"| nbgrader autograde | 1 | {nbgrader:.1f} | {nbgrader:.1f} | {3600 / nbgrader:.0f} |",
        f"| d2lite grade --workers 2, one submission, reference records computed | 1 | {cold:.1f} | {cold:.1f} | |",
        f"| d2lite grade --workers 2, one submission | 1 | {warm_single:.1f} | {warm_single:.1f} | {3600 / warm_single:.0f} |",
        f"| d2lite grade --workers 1 | {args.serial_students} | {w1:.1f} | {per_w1:.1f} | {3600 / per_w1:.0f} |",
        f"| d2lite grade --workers 2 | {len(students)} | {w2:.1f} | {per_w2:.1f} | {3600 / per_w2:.0f} |",
    ]
    if args.dask:
        per_dask = dask / len(students)
        lines += [
            f"| d2lite grade --scheduler (local Dask, 2 workers) | {len(students)} | {dask:.1f} | {per_dask:.1f} | "
            f"{3600 / per_dask:.0f} |",
            f"| the same, workers already warm | {len(students)} | {dask_again:.1f} | {dask_again / len(students):.1f} | "
            f"{3600 * len(students) / dask_again:.0f} |"]
    lines += [
        "",
        f"- `--workers 2` vs `--workers 1`: {per_w1 / per_w2:.2f}x the throughput; vs nbgrader autograde: "
        f"{nbgrader / per_w2:.1f}x faster per submission in a class, {nbgrader / warm_single:.1f}x for a single one.",
        f"- seconds per notebook (--workers 2): p50 {statistics.median(seconds):.1f}, p95 {_percentile(seconds, 0.95):.1f}; "
        f"peak memory of a sandbox {peak:.0f} MiB (the child's own pages; the warm server's are shared).",
    ]
    if args.dask:
        lines += [f"- Dask adds {dask - w2:+.1f} s over the local run ({(dask - w2) / (len(students) * n_nb):+.2f} s a "
                  f"notebook), {dask_again - w2:+.1f} s once its workers are warm."]
    lines += [
        f"- scores: identical across --workers 1, --workers 2{' and Dask' if args.dask else ''}: {same_scores}; the "
        f"honest submission's per-notebook scores equal nbgrader autograde's: {same_as_nbgrader}.",
    ]
    if baseline is not None:
        ref, old_w2, old_seconds, old_scores = baseline
        per_old = old_w2 / len(students)
        new_scores = _scores(w2_rows)
        lines[8:8] = [f"| before ({ref}): d2lite grade --workers 2 | {len(students)} | {old_w2:.1f} | {per_old:.1f} | "
                      f"{3600 / per_old:.0f} |"]
        lines += [f"- against the grader of {ref} on the same class in this run: {per_w2 / per_old:.2f}x its seconds "
                  f"per submission ({per_w2:.1f} vs {per_old:.1f}); seconds per notebook p50 "
                  f"{statistics.median(seconds):.1f} vs {statistics.median(old_seconds):.1f}, p95 "
                  f"{_percentile(seconds, 0.95):.1f} vs {_percentile(old_seconds, 0.95):.1f}; scores that differ: "
                  f"{sorted(k for k in new_scores if old_scores.get(k) != new_scores[k])}."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same_scores and same_as_nbgrader else 1


if __name__ == "__main__":
    sys.exit(main())
