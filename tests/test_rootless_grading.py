"""The rootless sandbox (what `d2lite grade` uses when not root): bubblewrap in an unprivileged user
namespace, the checker with no capability and not dumpable, the student's process as `nobody` in a
user, mount and PID namespace of its own. The mixed batch of tests/test_trusted_grading.py again in
that mode (D2LITE_SANDBOX=rootless picks it as root: CI runs as root; by hand, the whole module
also passed as the user `nobody` with a cgroup made over to it, see the README): every kind of
submission gets its exact score, and every cap and side effect holds as in the root sandbox."""
import pytest

import test_trusted_grading as trusted
from test_trusted_grading import (CASES, graded, test_an_attack_never_scores_more_than_its_honest_twin,  # noqa: F401
                                  test_caps_hold_while_running, test_each_kind_of_submission_gets_its_exact_score,
                                  test_every_submission_of_the_mixed_batch_is_graded_once,
                                  test_hostile_side_effects_did_not_happen)

from d2lite.grading import pool, sandbox

pytestmark = pytest.mark.skipif(trusted.MISSING is not None, reason=f"sandbox unavailable: {trusted.MISSING}")


@pytest.fixture(scope="module", autouse=True)
def rootless():
    """The rootless sandbox for this module's batch (warm sandboxes of the other mode closed first)."""
    pool.close_sandboxes()
    mp = pytest.MonkeyPatch()
    mp.setattr(sandbox, "ROOTLESS", True)
    sandbox.check_features()  # the rootless probes (a user namespace inside the sandbox's) pass here
    yield
    pool.close_sandboxes()
    mp.undo()


PROBE = ("import os\nstatus = open('/proc/self/status').read()\n"
         "caps = sorted({l.split()[1] for l in status.splitlines() if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))})\n"
         "print('PROBE', os.getuid(), os.getpid(), os.getppid(), caps)\n"
         "for path in ('/etc/ld.so.preload', '/PLANT', '/dev/PLANT', '/usr/PLANT'):\n"
         "    try:\n        open(path, 'w').close()\n        print('WROTE', path)\n"
         "    except OSError as e:\n        print('REFUSED', path, e.errno)\n"
         "os.kill(1, 9)\n")  # the init of its PID namespace: signals from inside are ignored


def test_the_student_process_is_nobody_in_a_pid_namespace_of_its_own(tmp_path_factory):
    root = trusted._course(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", trusted.nbgrader_env()["PATH"])
    try:
        folder = root / "submitted" / "probe" / trusted.ASSIGNMENT
        folder.mkdir(parents=True)
        trusted.nbformat.write(trusted._with(trusted.CORRECT, PROBE), str(folder / f"{trusted.NB}.ipynb"))
        rows = {r.student: r for r in trusted.grade(root, trusted.ASSIGNMENT, limits=trusted.LIMITS,
                                                      notebooks=[trusted.NB], echo=lambda *a: None)}
    finally:
        mp.undo()
    assert rows["probe"].score == trusted.FULL, rows["probe"]
    nb = trusted.nbformat.read(str(root / "autograded" / "probe" / trusted.ASSIGNMENT / f"{trusted.NB}.ipynb"), 4)
    printed = "".join(str(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
    line = next(line for line in printed.splitlines() if line.startswith("PROBE"))
    _, uid, pid, ppid, caps = line.split(" ", 4)
    assert (int(uid), int(pid), int(ppid)) == (65534, 2, 1), line  # nobody, below our init in its own PID namespace
    assert eval(caps) == ["0000000000000000"], line  # no capability, none to regain
    # the sandbox's root and /dev belong to the mapped uid, which is the student's too: read-only, or
    # a notebook could leave /etc/ld.so.preload for the next one on the same server (the red team's)
    assert "WROTE" not in printed and printed.count("REFUSED") == 4, printed[-2000:]
