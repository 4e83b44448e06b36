"""The cgroup v2 backend on a cgroup-v2-only Linux (most instructors' machines; ours are v1):
tests/cgroup2_mechanics.py runs as root in ../shared/tools/cgroup2-vm's QEMU guest (Debian 12's
kernel, cgroup_no_v1=all) and reports each check. ~1-2 minutes the first time on a machine (the
guest is set up), then ~30 s."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2lite.grading import cgroups, sandbox

ROOT = Path(__file__).resolve().parents[1]
VM = ROOT.parent / "shared" / "tools" / "cgroup2-vm" / "run.sh"
CHECKS = ["detected_v2", "nothing_missing", "memory_cap_oom_kill", "peak_near_cap", "swap_off",
          "other_kill_not_memory", "fork_loop_stopped_at_pids_max", "kill_all_leaves_nothing", "removed",
          "killed_grader_cleaned_next_run", "rootless_delegated_subtree", "rootless_fork_loop_capped_and_killed", "check_as_root", "check_as_rootless"]


@pytest.fixture(scope="module")
def guest():
    if not VM.exists():
        pytest.skip(f"no cgroup v2 guest here ({VM})")
    if os.geteuid() != 0:
        pytest.skip("the cgroup v2 guest's setup needs root")
    done = subprocess.run([str(VM), sys.executable, str(ROOT / "tests" / "cgroup2_mechanics.py")],
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the guest reported nothing (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.returncode, json.loads(lines[-1])


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
