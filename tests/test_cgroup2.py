"""The grader on a cgroup-v2-only Linux (most instructors' machines; ours are v1), in
../shared/tools/cgroup2-vm's QEMU guest (Debian 12's kernel, cgroup_no_v1=all):

- tests/cgroup2_mechanics.py: the v2 backend's mechanics with small payloads, as root and as a user
  with a delegated subtree (~1-2 minutes the first time on a machine, the guest being set up; then
  ~30 s);
- tests/cgroup2_grade.py: whole `d2lite grade` runs, as root, as `nobody` in a delegated subtree and
  as root in a podman container, side by side, of a class whose submissions meet every cap (memory,
  processes, wall time, output) and of honest and mistaken ones (~6 minutes: torch under emulation)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cgroup2_grade

from d2lite.grading import cgroups, sandbox

ROOT = Path(__file__).resolve().parents[1]
VM = ROOT.parent / "shared" / "tools" / "cgroup2-vm" / "run.sh"


CHECKS = ["detected_v2", "nothing_missing", "memory_cap_oom_kill", "peak_near_cap", "swap_off",
          "other_kill_not_memory", "fork_loop_stopped_at_pids_max", "kill_all_leaves_nothing", "removed",
          "killed_grader_cleaned_next_run", "rootless_delegated_subtree", "rootless_fork_loop_capped_and_killed", "check_as_root", "check_as_rootless"]


def _skip_without_guest() -> None:
    if not VM.exists():
        pytest.skip(f"no cgroup v2 guest here ({VM})")
    if os.geteuid() != 0:
        pytest.skip("the cgroup v2 guest's setup needs root")


def _in_guest(argv: list[str], timeout: float, **settings) -> tuple[int, str]:
    """Run ``argv`` in the guest; its exit status and the last JSON line it printed. The guest's
    cores are this machine's, said outright: run.sh asks `nproc`, which obeys OMP_NUM_THREADS, and an
    earlier test that read nbgrader_config.py set that to 1 in this process (one core made the
    guest's three warm servers miss their start-up time)."""
    env = {**os.environ, "CG2VM_SMP": str(len(os.sched_getaffinity(0))), **settings}
    done = subprocess.run([str(VM), *argv], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the guest reported nothing (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.returncode, lines[-1]


@pytest.fixture(scope="module")
def guest():
    _skip_without_guest()
    returncode, line = _in_guest([sys.executable, str(ROOT / "tests" / "cgroup2_mechanics.py")], timeout=900)
    return returncode, json.loads(line)


@pytest.mark.parametrize("name", CHECKS)
def test_cgroup_v2_backend_in_the_guest(guest, name):
    returncode, report = guest
    assert name in report["results"], report
    assert report["results"][name]["ok"], report["results"][name]
    assert returncode == 0 or report["failures"], report


def test_this_machine_is_detected_as_what_it_is():
    """Here (v1 controllers mounted under a tmpfs) the v1 backend; a v2 mount would be v2."""
    backend = cgroups.detect()
    v2 = (Path("/sys/fs/cgroup") / "cgroup.controllers").exists()
    assert backend.version == (2 if v2 else 1)
    assert isinstance(sandbox.backend(), type(backend))


def test_check_prints_what_it_found_and_what_it_will_use():
    done = subprocess.run([str(Path(sys.executable).parent / "d2lite"), "grade", "--check"],
                          capture_output=True, text=True, timeout=120)
    assert f"cgroup: v{cgroups.detect().version}" in done.stdout and "will use:" in done.stdout, done.stdout
    ready = done.stdout.strip().splitlines()[-1].startswith("verdict: ready")
    assert done.returncode == (0 if ready else 1), done.stdout + done.stderr
    if shutil.which("bwrap") and os.geteuid() == 0 and not cgroups.detect().missing():
        assert ready, done.stdout


def test_check_prints_the_caps_the_command_would_put_on_each_notebook():
    done = subprocess.run([str(Path(sys.executable).parent / "d2lite"), "grade", "--check", "--memory", "1536M",
                           "--timeout", "90", "--processes", "12", "--output", "2M"],
                          capture_output=True, text=True, timeout=120)
    if not done.stdout.strip().splitlines()[-1].startswith("verdict: ready"):
        pytest.skip("the sandbox is unavailable here: --check prints no caps")
    lines = done.stdout.splitlines()
    caps = lines[lines.index("caps:") + 1:-1]
    text = "\n".join(caps)
    assert "memory: 1536 MiB per notebook" in text and "processes: 12 tasks" in text, text
    assert "wall time: 90 s" in text and "output: 2 MiB" in text, text
    assert ("memory.max" if cgroups.detect().version == 2 else "memory.limit_in_bytes") in text, text


def test_v2_refuses_a_subtree_it_cannot_write(tmp_path):
    """A v2 cgroup the grader may not write is named as missing, with the way to get one."""
    fake = tmp_path / "cg"
    fake.mkdir()
    (fake / "cgroup.controllers").write_text("cpu io\n")
    (fake / "cgroup.procs").write_text("")
    (fake / "cgroup.subtree_control").write_text("")
    missing = cgroups.V2(mount=fake, base=fake).missing()
    text = " ".join(missing)
    assert "memory controller" in text and "pids controller" in text, missing


# --- whole grades in the guest, as root and rootless ------------------------------------------

MODES = ["root", "rootless", "container"]


@pytest.fixture(scope="module")
def grades(tmp_path_factory):
    _skip_without_guest()
    shared = tmp_path_factory.mktemp("cg2grade")
    course = shared / "course"
    script = str(ROOT / "tests" / "cgroup2_grade.py")
    subprocess.run([sys.executable, script, "prepare", str(course)], check=True, capture_output=True, timeout=300)
    _, line = _in_guest([sys.executable, script, "run", str(course)], timeout=1900,
                        CG2VM_RW=str(shared), CG2VM_MEM="6G", CG2VM_TIMEOUT="1800")
    (shared / "report.json").write_text(line)  # kept with pytest's temporary files, to read after a failure
    return json.loads(line)


def _mode(grades, mode):
    if mode == "container" and not shutil.which("podman"):
        pytest.skip("no podman here (.ci/run installs it)")
    ran = grades["modes"][mode]
    assert ran.get("exit") == 0 and ran.get("error") is None and "rows" in ran, ran
    assert ran["cgroup"] == 2 and ran["rootless"] == (mode == "rootless"), ran
    assert (ran["uid"] == 0) == (mode != "rootless"), ran
    return ran


@pytest.mark.parametrize("mode", MODES)
def test_v2_each_submission_gets_its_score_in_the_report_and_the_gradebook(grades, mode):
    ran = _mode(grades, mode)
    scores = {student: row["score"] for student, row in ran["rows"].items()}
    assert scores == cgroup2_grade.EXPECTED, ran["rows"]
    assert ran["gradebook"] == cgroup2_grade.EXPECTED, ran["gradebook"]
    assert all(row["graded"] for row in ran["rows"].values()), ran["rows"]
    assert ran["rows"]["honest"]["reasons"] == [], ran["rows"]["honest"]
    assert any("test_lists" in r for r in ran["rows"]["wrong"]["reasons"]), ran["rows"]["wrong"]


@pytest.mark.parametrize("mode", MODES)
def test_v2_memory_bomb_is_killed_at_the_cap_and_reported_as_memory(grades, mode):
    rows = _mode(grades, mode)["rows"]
    row = rows["memory_bomb"]
    cap_mib = grades["caps"]["memory"] / 2**20
    assert any("memory cap" in r for r in row["reasons"]), row
    assert 0.9 * cap_mib <= row["peak_mib"] <= cap_mib + 1, row
    # the batch went on: the students graded after it (in name order) got their scores
    assert rows["output_flood"]["score"] == 0 and rows["wrong"]["score"] == 2


@pytest.mark.parametrize("mode", MODES)
def test_v2_fork_loop_stops_at_the_process_cap(grades, mode):
    ran = _mode(grades, mode)
    cap = grades["caps"]["processes"]
    # its own count of the forks that succeeded (of 200 tried): the cap counts it and its children
    assert ran["forked"] is not None and 0 < ran["forked"] < cap, ran.get("forked")
    killed = [int(r.split()[0]) for r in ran["rows"]["fork_loop"]["reasons"] if "still running at the end" in r]
    assert all(n < cap for n in killed), ran["rows"]["fork_loop"]


@pytest.mark.parametrize("mode", MODES)
def test_v2_endless_loop_is_stopped_at_the_wall_clock_cap(grades, mode):
    row = _mode(grades, mode)["rows"]["endless_loop"]
    wall = grades["caps"]["wall"]
    assert any("wall-clock cap" in r for r in row["reasons"]), row
    assert wall <= row["seconds"] < wall + 30, row


@pytest.mark.parametrize("mode", MODES)
def test_v2_output_flood_is_stopped_at_the_output_cap(grades, mode):
    row = _mode(grades, mode)["rows"]["output_flood"]
    assert any("MiB of output" in r for r in row["reasons"]), row
    assert row["seconds"] < grades["caps"]["wall"], row


def test_v2_nothing_is_left_running_after_every_grade(grades):
    for mode in MODES:
        _mode(grades, mode)
    assert grades["left_running_not_root"] == [], grades["left_running_not_root"]
    # what stays is the graders' own (empty) leaves, which the next run removes
    assert all(procs == [] and name.endswith("-grader") for name, procs in grades["cgroups_left"].items()), \
        grades["cgroups_left"]


def test_v2_container_without_privileges_refuses_and_names_what_is_missing(grades):
    if not shutil.which("podman"):
        pytest.skip("no podman here (.ci/run installs it)")
    seen = grades["container_unprivileged_check"]
    text = "\n".join(seen["lines"])
    assert seen["exit"] == 0 and seen["lines"][-1].startswith("verdict: cannot grade here"), text
    assert "write access to the cgroup v2 subtree" in text and "MISSING" in text, text
