"""One complete honest submission of the chapter (the ten reference answers), graded side by side
in one run: `nbgrader autograde` vs `d2lite grade` (reference records cold, then cached).

    .venv/bin/python benchmarks/bench_grading.py [--out benchmarks/results]   (as root: the sandbox)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _course(tmp: Path, env: dict) -> Path:
    root = tmp / "course"
    shutil.copytree(ROOT / "solutions", root / "solutions")
    shutil.copy(ROOT / "nbgrader_config.py", root)
    subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment", "batch_norm", "--force"],
                   cwd=root, check=True, capture_output=True, env=env)
    import nbformat

    # an honest student's answers: the reference's, each with a comment of its own (a submission
    # identical to the reference would reuse the reference's records and measure nothing)
    for student in ("nbgrader_student", "d2lite_student"):
        folder = root / "submitted" / student / "batch_norm"
        folder.mkdir(parents=True)
        for path in sorted((root / "solutions" / "batch_norm").glob("*.ipynb")):
            nb = nbformat.read(str(path), as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
                    cell.source += "\n# my answer"
            nbformat.write(nb, str(folder / path.name))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        root = _course(Path(tmp), env)
        d2lite = [str(Path(sys.executable).parent / "d2lite"), "grade", "batch_norm", "--student", "d2lite_student"]
        timings = {}
        for label, cmd in (("nbgrader autograde", [str(Path(sys.executable).parent / "nbgrader"), "autograde",
                                                   "batch_norm", "--student", "nbgrader_student", "--force"]),
                           ("d2lite grade, reference records computed (first run)", d2lite),
                           ("d2lite grade, reference records cached", d2lite)):
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            timings[label] = time.perf_counter() - start
            if result.returncode:
                print(result.stdout[-3000:], result.stderr[-3000:])
                raise SystemExit(f"{label} failed")
            print(f"{label}: {timings[label]:.1f} s", flush=True)
    load = os.getloadavg()[0]
    lines = ["# Grading one complete honest submission (ten notebooks), side by side", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"load average at the end {load:.1f}; `.venv/bin/python benchmarks/bench_grading.py`", "",
             "| grader | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grading.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
