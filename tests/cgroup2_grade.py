"""One whole `d2lite grade` on a cgroup-v2-only machine (run as root in ../shared/tools/cgroup2-vm's
guest by hand: torch under emulation takes minutes, too slow for CI): an honest notebook, the hostile
suite's memory bomb and a fork bomb, graded through the cgroup v2 backend. Prints one JSON line:
each student's score, its reasons, the peak memory, and whether anything of it is left running.

    CG2VM_TIMEOUT=3000 CG2VM_RW=/tmp/cg2 ../shared/tools/cgroup2-vm/run.sh \\
        .venv/bin/python tests/cgroup2_grade.py /tmp/cg2
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("D2LITE_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import nbformat  # noqa: E402
from notebook_utils import ASSIGNMENT, nbgrader_env, new_course  # noqa: E402
from test_trusted_grading import CORRECT, FULL, NB, _with  # noqa: E402

from d2lite.grading import cgroups, sandbox  # noqa: E402
from d2lite.grading.runner import grade  # noqa: E402

FORK_BOMB = "import os\nfor _ in range(100000):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
MEMORY_BOMB = "hog = []\nwhile True:\n    hog.append(torch.ones(64 << 20, dtype=torch.uint8))\n"


def main() -> int:
    base = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=base, prefix="course-"))
    os.environ["PATH"] = nbgrader_env()["PATH"]
    new_course(root, Path(tempfile.mkdtemp(dir=base, prefix="exchange-")))
    for student, prefix in (("honest", ""), ("memory_bomb", MEMORY_BOMB), ("fork_bomb", FORK_BOMB)):
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(_with(CORRECT, prefix), str(folder / f"{NB}.ipynb"))
    limits = sandbox.Limits(memory=1 << 30, wall=900, cpu=1800, processes=64, output=4 << 20)
    start = time.monotonic()
    rows = grade(root, ASSIGNMENT, limits=limits, notebooks=[NB], workers=1, echo=print)
    left = subprocess.run(["pgrep", "-u", "nobody"], capture_output=True, text=True).stdout.split()
    print(json.dumps({"backend": cgroups.detect().version, "seconds": round(time.monotonic() - start, 1),
                      "full": FULL, "left_running_as_nobody": left,
                      "rows": {r.student: {"score": r.score, "peak_mib": round(r.peak_mib, 1),
                                           "seconds": round(r.seconds, 1), "reasons": r.reasons[:3]}
                               for r in rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
