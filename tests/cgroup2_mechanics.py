"""The cgroup v2 backend's mechanics, run as root on a cgroup-v2-only machine (tests/test_cgroup2.py
runs it in ../shared/tools/cgroup2-vm's guest). Small payloads, no torch: d2lite/grading/cgroups.py
is loaded by path, so d2lite's package (which imports torch) is not. Prints one JSON line of
findings and exits 0 if every check held.

Checks: detection; a memory cap ends in an OOM kill reported as memory, with a peak; a fork loop
stops at pids.max; kill_all (cgroup.kill) leaves nothing; a grader killed mid-run leaves cgroups
that the next run's remove_stale clears (its processes killed); and, rootless, a user (`nobody`)
given a delegated subtree (as systemd's Delegate=yes gives one) finds it, enables the controllers
and caps memory there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = HERE.parent / "d2lite" / "grading" / "cgroups.py"


def load():
    spec = importlib.util.spec_from_file_location("d2lite_cgroups", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cgroups = load()
# d2lite/grading/sandbox.py (which `d2lite grade --check` prints from) needs only cgroups.py beside it:
# loaded as a package of its own, without d2lite's (torch)
LOADER = ("import importlib, sys, types\n"
          f"pkg = types.ModuleType('d2g'); pkg.__path__ = [{str(MODULE.parent)!r}]; sys.modules['d2g'] = pkg\n"
          "sandbox = importlib.import_module('d2g.sandbox')\n")
MiB = 1 << 20
results: dict[str, object] = {}
failures: list[str] = []


def check(name: str, ok: bool, detail) -> None:
    results[name] = {"ok": bool(ok), "detail": detail}
    if not ok:
        failures.append(name)


def run_in(group, code: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess:
    """python -c code, started inside ``group`` (and as ``user``), bounded by ``timeout``."""
    def enter():
        group.join()
        if user:
            entry = pwd.getpwnam(user)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
    # a user other than root may not reach this interpreter (under /root): the system's then
    python = sys.executable if user is None or not Path("/usr/bin/python3").exists() else "/usr/bin/python3"
    return subprocess.run([python, "-I", "-c", code], preexec_fn=enter, capture_output=True,
                          text=True, timeout=timeout)


def main() -> int:
    backend = cgroups.detect()
    check("detected_v2", backend.version == 2, type(backend).__name__)
    check("nothing_missing", backend.missing() == [], backend.missing())

    # memory: 64 MiB cap, 256 MiB asked for -> the OOM killer, reported as such
    group = backend.create(64 * MiB, 16)
    out = run_in(group, "x = bytearray(256 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('survived')")
    check("memory_cap_oom_kill", out.returncode == -signal.SIGKILL and group.oom_killed() and "survived" not in out.stdout,
          {"returncode": out.returncode, "oom_killed": group.oom_killed(), "peak_mib": group.peak() / MiB})
    check("peak_near_cap", 32 * MiB < group.peak() <= 64 * MiB + MiB, group.peak() / MiB)
    swap = group.path / "memory.swap.max"
    check("swap_off", not swap.exists() or swap.read_text().strip() == "0",
          swap.read_text().strip() if swap.exists() else "no swap accounting")
    group.kill_all()
    group.remove()

    # an ordinary kill is not a memory kill
    group = backend.create(64 * MiB, 16)
    out = run_in(group, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    check("other_kill_not_memory", out.returncode == -signal.SIGKILL and not group.oom_killed(),
          {"returncode": out.returncode, "oom_killed": group.oom_killed()})
    group.remove()

    # a fork loop stops at pids.max; every child sleeps; kill_all leaves nothing
    group = backend.create(256 * MiB, 20)
    fork_loop = ("import os, time\nn = 0\nend = time.monotonic() + 20\n"
                 "while time.monotonic() < end:\n"
                 "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
                 "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\n"
                 "print(n, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-I", "-c", fork_loop], preexec_fn=group.join,
                            stdout=subprocess.PIPE, text=True)
    forked = int(proc.stdout.readline() or -1)
    members = group.procs()
    inside = len(members)
    check("fork_loop_stopped_at_pids_max", 0 < forked < 20 and inside <= 20, {"forked": forked, "in_cgroup": inside})
    found = group.kill_all()
    proc.wait(timeout=30)
    left = group.procs()
    time.sleep(0.2)
    alive = [p for p in members if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    check("kill_all_leaves_nothing", found == inside and left == [] and alive == [],
          {"found": found, "left": left, "alive": alive})
    group.remove()
    check("removed", not group.path.exists(), str(group.path))

    # a grader killed mid-run: its sandbox cgroup (a sleeping process in it) and its own leaf stay;
    # the next run's remove_stale kills and removes them
    grader = ("import importlib.util, subprocess, sys, time\n"
              f"spec = importlib.util.spec_from_file_location('c', {str(MODULE)!r})\n"
              "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
              "b = c.detect(); g = b.create(64 << 20, 8)\n"
              "subprocess.Popen(['sleep', '300'], preexec_fn=g.join, start_new_session=True)\n"
              "print(g.path, flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-I", "-c", grader], stdout=subprocess.PIPE, text=True)
    left_path = Path(proc.stdout.readline().strip())
    sleeper = [int(p) for p in (left_path / "cgroup.procs").read_text().split()]
    proc.kill()
    proc.wait()
    time.sleep(0.2)
    before = sorted(p.name for p in backend.base.glob("d2lite-*"))
    removed = cgroups.V2().remove_stale()
    after = sorted(p.name for p in backend.base.glob("d2lite-*"))
    alive = [p for p in sleeper if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    check("killed_grader_cleaned_next_run", left_path.name in before and not left_path.exists() and not alive,
          {"left_behind": before, "removed": removed, "after": after, "sleeper_alive": alive})

    # rootless: `nobody` in a subtree delegated to it (chown of the directory and of cgroup.procs,
    # cgroup.subtree_control, cgroup.threads, as systemd's Delegate=yes does)
    delegated = backend.base / "d2lite-test-delegated"
    nobody = pwd.getpwnam("nobody")
    _delegate(delegated, nobody)
    user_code = ("import importlib.util, json, os, subprocess, sys\n"
                 f"spec = importlib.util.spec_from_file_location('c', {str(MODULE)!r})\n"
                 "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
                 "b = c.detect()\nmissing = b.missing()\n"
                 "g = b.create(48 << 20, 8)\n"
                 "p = subprocess.run([sys.executable, '-I', '-S', '-c', 'x = bytearray(200 << 20)\\nfor i in range(0, len(x), 4096): x[i] = 1'],"
                 " preexec_fn=g.join)\n"
                 "oom = g.oom_killed(); g.kill_all(); g.remove()\n"
                 # processes: a fork loop whose children sleep stops at pids.max; kill-all leaves nothing
                 "h = b.create(64 << 20, 12)\n"
                 "loop = 'import os, time\\nn = 0\\nwhile n < 100:\\n    try:\\n        pid = os.fork()\\n    except OSError:\\n        break\\n"
                 "    if pid == 0:\\n        time.sleep(60)\\n        os._exit(0)\\n    n += 1\\nprint(n, flush=True)\\ntime.sleep(60)\\n'\n"
                 "q = subprocess.Popen([sys.executable, '-I', '-S', '-c', loop], preexec_fn=h.join, stdout=subprocess.PIPE, text=True)\n"
                 "forked = int(q.stdout.readline() or -1)\ninside = len(h.procs())\nfound = h.kill_all()\nq.wait(timeout=30)\n"
                 "left = h.procs(); h.remove()\n"
                 "print(json.dumps({'uid': os.getuid(), 'base': str(b.base), 'missing': missing, 'returncode': p.returncode,"
                 " 'oom': oom, 'forked': forked, 'inside': inside, 'found': found, 'left': left}))\n")
    out = run_in(_Entry(delegated), user_code, user="nobody")
    try:
        seen = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        seen = {"stdout": out.stdout[-2000:], "stderr": out.stderr[-2000:]}
    check("rootless_delegated_subtree", seen.get("uid") == nobody.pw_uid and seen.get("missing") == []
          and seen.get("returncode") == -signal.SIGKILL and seen.get("oom") is True, seen)
    check("rootless_fork_loop_capped_and_killed", 0 < seen.get("forked", -1) < 12 and seen.get("inside", 99) <= 12
          and seen.get("found") == seen.get("inside") and seen.get("left") == [], seen)
    _remove(delegated)

    # what `d2lite grade --check` prints, as root and as `nobody` in a delegated subtree
    describe = LOADER + "print('\\n'.join(sandbox.describe()))\n"
    root_lines = subprocess.run([sys.executable, "-I", "-c", describe], capture_output=True, text=True,
                                timeout=120).stdout.splitlines()
    check("check_as_root", any(line.startswith("cgroup: v2") for line in root_lines)
          and any(line.startswith("sandbox: root") for line in root_lines)
          and root_lines[-1:] and root_lines[-1].startswith("verdict: ready")
          and any(line.startswith("  memory: 4 GiB per notebook (memory.max") for line in root_lines), root_lines)
    _delegate(delegated, nobody)
    out = run_in(_Entry(delegated), describe, user="nobody", timeout=120)
    user_lines = out.stdout.splitlines() or [out.stderr[-2000:]]
    check("check_as_rootless", any(line.startswith("cgroup: v2") for line in user_lines)
          and any(line.startswith("sandbox: rootless") for line in user_lines)
          and user_lines[-1].startswith("verdict: ready")
          and any(line.startswith("  processes: 64 tasks") for line in user_lines), user_lines)
    _remove(delegated)

    print(json.dumps({"failures": failures, "results": results}))
    return 1 if failures else 0


def _delegate(path: Path, user) -> None:
    """A fresh cgroup made over to ``user`` (the directory, cgroup.procs, cgroup.subtree_control and
    cgroup.threads chowned, as systemd's Delegate=yes does)."""
    if path.exists():
        _remove(path)
    path.mkdir()
    for item in (path, path / "cgroup.procs", path / "cgroup.subtree_control", path / "cgroup.threads"):
        os.chown(item, user.pw_uid, user.pw_gid)


def _remove(path: Path) -> None:
    """Remove a cgroup and the (empty) cgroups below it, deepest first."""
    for child in sorted(path.glob("**/"), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass


class _Entry:
    """Starts the rootless user's process in the delegated cgroup itself (as systemd starts a
    delegated unit's main process there)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))


if __name__ == "__main__":
    sys.exit(main())
