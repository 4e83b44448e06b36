"""The one place that talks to the OS: a bubblewrap sandbox per notebook, in its own cgroup."""
from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Limits", "Outcome", "SandboxUnavailable", "check_features", "run"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
GiB = 1 << 30


class SandboxUnavailable(RuntimeError):
    """The machine lacks a kernel feature or tool the sandbox needs: refuse rather than grade unprotected."""


@dataclass(frozen=True)
class Limits:
    """Caps for one notebook's sandbox."""

    memory: int = 4 * GiB          # bytes, the cgroup's limit (RAM; swap too where accounted)
    wall: float = 300.0            # seconds for the whole notebook
    cpu: int = 600                 # CPU seconds per process (RLIMIT_CPU)
    processes: int = 64            # tasks (processes and threads) in the cgroup
    output: int = 8 << 20          # bytes of stdout+stderr before the sandbox is killed
    records: int = 64 << 20        # bytes of probe records before the sandbox is killed
    disk: int = 256 << 20          # bytes of its private home directory (a tmpfs)
    file_size: int = 256 << 20     # bytes, RLIMIT_FSIZE


@dataclass
class Outcome:
    """What came out of one sandbox run."""

    returncode: int | None
    records: bytes
    output: bytes                  # the first bytes of stdout+stderr (up to 1 MiB)
    output_bytes: int              # all bytes written to stdout+stderr
    seconds: float
    peak_memory: int               # bytes, the cgroup's high-water mark
    killed: str | None = None      # "timeout", "memory", "output", "records" or None
    leftover: int = 0              # processes still in the cgroup after the kill (should be 0)
    notes: list[str] = field(default_factory=list)


def _cgroup_dirs() -> tuple[Path, Path]:
    return CGROUP_ROOT / "memory", CGROUP_ROOT / "pids"


def check_features() -> None:
    """Raise SandboxUnavailable naming every missing feature: bubblewrap (user, mount, PID, network,
    IPC and UTS namespaces), root (to create cgroups and drop to `nobody`), cgroup v1 `memory` and
    `pids` controllers, and the user `nobody`."""
    missing = []
    if shutil.which("setpriv") is None:
        missing.append("setpriv (util-linux)")
    if shutil.which("bwrap") is None:
        missing.append("bubblewrap (`bwrap`; Debian/Ubuntu: apt-get install bubblewrap)")
    if os.geteuid() != 0:
        missing.append("root (the grader creates a cgroup per notebook and runs it as `nobody`)")
    memory, pids = _cgroup_dirs()
    if not (memory / "memory.limit_in_bytes").exists():
        missing.append(f"the cgroup v1 memory controller at {memory}")
    if not (pids / "pids.max").exists() and not (pids / "cgroup.procs").exists():
        missing.append(f"the cgroup v1 pids controller at {pids}")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        missing.append("the user `nobody`")
    if not missing:
        probe = subprocess.run(_bwrap_args([], Path("/"), {}) + ["/bin/true"], capture_output=True,
                               timeout=30)
        if probe.returncode != 0:
            missing.append("mount, PID, network, IPC and UTS namespaces (bwrap said: "
                           f"{probe.stderr.decode(errors='replace').strip()[:300]})")
    if missing:
        raise SandboxUnavailable("d2lite grade needs, and this machine lacks: " + "; ".join(missing)
                                 + ". It refuses to run student code unprotected.")


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _bwrap_args(ro_binds: list[Path], submission: Path, env: dict[str, str],
                disk: int = 64 << 20) -> list[str]:
    uid, gid = _nobody()
    # bwrap runs as root (no user namespace, so `nobody` inside is the real `nobody` outside) and
    # keeps only CAP_SETUID/SETGID for setpriv, which drops to `nobody` with no capabilities left
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "--hostname", "sandbox", "--clearenv",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--ro-bind-try", "/etc/passwd", "/etc/passwd", "--ro-bind-try", "/etc/group", "/etc/group",
            "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", str(disk), "--tmpfs", "/tmp",
            "--perms", "0777", "--size", str(disk), "--tmpfs", "/home/student"]
    seen = set()
    for path in ro_binds:
        path = Path(path).resolve()
        if str(path) not in seen and path.exists():
            seen.add(str(path))
            for parent in reversed(path.parents[:-1]):  # bwrap would create them 0700
                if str(parent) not in seen:
                    seen.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", str(path), str(path)]
    args += ["--ro-bind", str(submission), "/submission", "--chdir", "/home/student"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args + ["--", "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


class _Cgroup:
    """A memory + pids cgroup (v1) for one sandbox; everything in it is killed at the end."""

    def __init__(self, limits: Limits) -> None:
        name = f"d2lite-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        memory, pids = _cgroup_dirs()
        self.memory, self.pids = memory / name, pids / name
        self.memory.mkdir()
        self.pids.mkdir()
        (self.memory / "memory.limit_in_bytes").write_text(str(limits.memory))
        memsw = self.memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:
                memsw.write_text(str(limits.memory))
            except OSError:
                pass
        (self.pids / "pids.max").write_text(str(limits.processes))

    def join(self) -> None:  # in the child, before exec
        pid = str(os.getpid())
        (self.memory / "cgroup.procs").write_text(pid)
        (self.pids / "cgroup.procs").write_text(pid)

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in (self.pids / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_killed(self) -> bool:
        try:
            failcnt = int((self.memory / "memory.failcnt").read_text())
            control = (self.memory / "memory.oom_control").read_text()
        except OSError:
            return False
        kills = [int(line.split()[1]) for line in control.splitlines() if line.startswith("oom_kill ")]
        return (kills and kills[0] > 0) or failcnt > 0

    def peak(self) -> int:
        try:
            return int((self.memory / "memory.max_usage_in_bytes").read_text())
        except OSError:
            return 0

    def kill_all(self) -> int:
        """SIGKILL every process in the cgroup until none is left; return how many were found."""
        found = 0
        for _ in range(100):
            procs = self.procs()
            if not procs:
                break
            found = max(found, len(procs))
            for pid in procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        return found

    def remove(self) -> None:
        for path in (self.memory, self.pids):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _reader(stream, cap: int, keep: int, sink: dict, on_over) -> None:
    total, kept = 0, []
    while True:
        chunk = stream.read1(1 << 16) if hasattr(stream, "read1") else stream.read(1 << 16)
        if not chunk:
            break
        if total < keep:
            kept.append(chunk[: keep - total])
        total += len(chunk)
        if total > cap:
            on_over()
            break
    sink["data"], sink["total"] = b"".join(kept), total
    stream.close()


def run(command: list[str], stdin: bytes, *, submission: Path, ro_binds: list[Path],
        env: dict[str, str], limits: Limits = Limits()) -> Outcome:
    """Run ``command`` in a fresh sandbox and return its records (what it wrote to the fd named by $D2LITE_RECORDS_FD) and output.

    The sandbox sees /usr, the paths in ``ro_binds`` (read-only), ``submission`` at /submission
    (read-only) and a private tmpfs home (cwd) of ``limits.disk`` bytes; it has its own PID, mount,
    network (loopback only), IPC, UTS and user namespaces, runs as `nobody` without capabilities, in a
    cgroup capped at ``limits.memory`` bytes and ``limits.processes`` tasks. Everything it started is
    killed when it ends, times out or exceeds a cap.
    """
    cgroup = _Cgroup(limits)
    records_r, records_w = os.pipe()
    killed: list[str] = []
    proc = None

    def child() -> None:
        cgroup.join()
        for res, value in ((resource.RLIMIT_CPU, limits.cpu), (resource.RLIMIT_FSIZE, limits.file_size),
                           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 1024)):
            resource.setrlimit(res, (value, value))

    start = time.monotonic()
    try:
        env = {**env, "D2LITE_RECORDS_FD": str(records_w)}
        proc = subprocess.Popen(_bwrap_args(ro_binds, submission, env, limits.disk) + command,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=child, pass_fds=(records_w,), close_fds=True)
        os.close(records_w)
        records_w = -1

        def over(what):
            def kill():
                killed.append(what)
                cgroup.kill_all()
            return kill

        out_sink, rec_sink = {}, {}
        readers = [threading.Thread(target=_reader, args=(proc.stdout, limits.output, 1 << 20, out_sink,
                                                           over("output")), daemon=True),
                   threading.Thread(target=_reader, args=(os.fdopen(records_r, "rb"), limits.records,
                                                           limits.records, rec_sink, over("records")),
                                    daemon=True)]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=limits.wall)
        except subprocess.TimeoutExpired:
            killed.append("timeout")
        leftover = cgroup.kill_all()
        proc.wait()
        for t in readers:
            t.join(timeout=10)
        seconds = time.monotonic() - start
        if not killed and cgroup.oom_killed() and proc.returncode != 0:
            killed.append("memory")
        return Outcome(returncode=proc.returncode, records=rec_sink.get("data", b""),
                       output=out_sink.get("data", b""), output_bytes=out_sink.get("total", 0),
                       seconds=seconds, peak_memory=cgroup.peak(), killed=killed[0] if killed else None,
                       leftover=leftover)
    finally:
        if records_w >= 0:
            os.close(records_w)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cgroup.kill_all()
        cgroup.remove()


def python_command() -> list[str]:
    """The interpreter (the grader's own, isolated mode) and the in-sandbox worker module."""
    return [sys.executable, "-I", "-m", "d2lite.grading.worker"]
