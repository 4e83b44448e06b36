"""The one place that talks to the OS: a warm bubblewrap sandbox per worker, a fresh child and cgroup per notebook."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups

__all__ = ["Limits", "Outcome", "SandboxUnavailable", "Warm", "check_features"]

DIRTY = 75  # the child's exit status when it found the private directories not empty after wiping
GiB = 1 << 30
CHECKER_PROCESSES = 32  # the checker's own processes and threads (it runs no student code)
# Not root: bubblewrap in an unprivileged user namespace; the checker keeps the one mapped uid (no
# capability, not dumpable) and the student's process runs as `nobody` in a user, mount and PID
# namespace of its own, where it cannot name the checker. D2LITE_SANDBOX=rootless picks this mode as
# root too (tests; a root that would rather not use its privileges).
ROOTLESS = os.geteuid() != 0 or os.environ.get("D2LITE_SANDBOX") == "rootless"


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


_BACKEND: cgroups.Backend | None = None


def backend() -> cgroups.Backend:
    """The cgroup backend of this machine (detected once)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = cgroups.detect()
    return _BACKEND


def check_features() -> None:
    """Raise SandboxUnavailable naming every missing feature: bubblewrap (user, mount, PID, network,
    IPC and UTS namespaces), root (to drop to `nobody`), the memory and pids controllers of cgroup
    v1 or v2 (cgroups.detect: on v2, a delegated subtree), and the user `nobody`."""
    missing = []
    if shutil.which("setpriv") is None:
        missing.append("setpriv (util-linux)")
    if shutil.which("bwrap") is None:
        missing.append("bubblewrap (`bwrap`; Debian/Ubuntu: apt-get install bubblewrap)")
    missing += backend().missing()
    if not ROOTLESS:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            missing.append("the user `nobody`")
    if not missing:
        probe = subprocess.run(_bwrap_args([], {}) + ["/bin/true"], capture_output=True,
                               timeout=30)
        if probe.returncode != 0:
            missing.append(("an unprivileged user namespace with " if ROOTLESS else "")
                           + "mount, PID, network, IPC and UTS namespaces (bwrap said: "
                           f"{probe.stderr.decode(errors='replace').strip()[:300]})")
    if not missing and ROOTLESS:
        probe = subprocess.run(_bwrap_args([], {}) + ["unshare", "--user", "--map-user=65534", "--pid", "--fork",
                                                      "--mount", "/bin/true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            missing.append("a user namespace inside the sandbox's (the student's process runs in one of its own; "
                           f"unshare said: {probe.stderr.decode(errors='replace').strip()[:300]})")
    if missing:
        raise SandboxUnavailable("d2lite grade needs, and this machine lacks: " + "; ".join(missing)
                                 + ". It refuses to run student code unprotected.")


def _amount(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def caps(limits: Limits, version: int) -> list[str]:
    """Each cap of ``limits`` and what enforces it on a cgroup ``version`` machine, in words."""
    memory = ("memory.max, memory.swap.max 0; a kill read from memory.events oom_kill" if version == 2 else
              "memory.limit_in_bytes, and memory.memsw.limit_in_bytes where swap is accounted; a kill read "
              "from memory.oom_control")
    return [f"  memory: {_amount(limits.memory)} per notebook ({memory})",
            f"  processes: {limits.processes} tasks (processes and threads) per notebook (pids.max)",
            f"  wall time: {limits.wall:g} s per notebook (the grader's clock, then a kill of its whole cgroup"
            + (": cgroup.kill)" if version == 2 else ")"),
            f"  output: {_amount(limits.output)} of stdout+stderr per notebook (read by the grader, then a kill "
            "of its whole cgroup)",
            f"  CPU time: {limits.cpu} s per process (RLIMIT_CPU)",
            f"  disk: {_amount(limits.disk)} in each private tmpfs (home, /tmp, /dev/shm); files up to "
            f"{_amount(limits.file_size)} (RLIMIT_FSIZE)"]


def describe(limits: Limits | None = None) -> list[str]:
    """What ``d2lite grade --check`` prints: what this machine has, what the grader will use, and
    the caps ``limits`` (the command's) would put on each notebook."""
    b = backend()
    lines = [f"cgroup: v{b.version} ({'unified hierarchy' if b.version == 2 else 'memory and pids hierarchies'} "
             f"at /sys/fs/cgroup)", f"  will use: {b.describe()}"]
    for what in b.missing():
        lines.append(f"  MISSING: {what}")
    lines.append(f"user: uid {os.geteuid()}" + (" (root)" if os.geteuid() == 0 else " (not root)"))
    lines.append("sandbox: " + ("rootless: bubblewrap in an unprivileged user namespace; the student's process "
                                "as `nobody` in a user, mount and PID namespace of its own, the checker "
                                "without capabilities and not dumpable" if ROOTLESS else
                                "root: bubblewrap without a user namespace; the student's process as "
                                "`nobody` and the checker as a uid of its own (setresuid), no capabilities"))
    for tool in ("bwrap", "setpriv"):
        lines.append(f"{tool}: {shutil.which(tool) or 'MISSING'}")
    try:
        check_features()
    except SandboxUnavailable as error:
        lines.append(f"verdict: cannot grade here. {error}")
        return lines
    lines.append("caps:")
    lines += caps(limits or Limits(), b.version)
    lines.append("verdict: ready: each notebook runs in bubblewrap (PID, mount, network, IPC, UTS namespaces"
                 + (", and a user namespace" if ROOTLESS else "") + ") as `nobody`, with the caps above")
    return lines


def remove_stale_cgroups() -> int:
    """Remove the cgroups a killed grader left behind (``d2lite-<pid>-…`` of a pid that is gone)."""
    return backend().remove_stale()


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def checker_ids() -> tuple[int, int]:
    """The uid and gid the checker runs as: unused ids just below `nobody`'s, so that the student's
    process (`nobody`) can neither signal, trace nor read the checker."""
    uid, gid = _nobody()
    taken_uids = {e.pw_uid for e in pwd.getpwall()}
    candidate = uid - 1
    while candidate in taken_uids and candidate > 1000:
        candidate -= 1
    return candidate, candidate


def _bwrap_args(ro_binds: list[Path], env: dict[str, str], disk: int = 64 << 20,
                drop: bool = True) -> list[str]:
    if ROOTLESS:
        return _bwrap_rootless(ro_binds, env, disk)
    uid, gid = _nobody()
    # bwrap runs as root (no user namespace, so `nobody` inside is the real `nobody` outside) and
    # keeps only CAP_SETUID/SETGID: for setpriv (drop=True), which drops to `nobody` with no
    # capabilities left, or (with CAP_SETPCAP) for the fork server, whose children drop themselves
    common = _bwrap_common(ro_binds, env, disk)
    args = [common[0], "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", *common[1:]]
    if not drop:  # the fork server also empties its children's bounding set (CAP_SETPCAP)
        return args + ["--cap-add", "CAP_SETPCAP", "--"]
    return args + ["--", "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def _bwrap_rootless(ro_binds: list[Path], env: dict[str, str], disk: int) -> list[str]:
    """bubblewrap in an unprivileged user namespace (this user mapped to itself, no capability)."""
    args = _bwrap_common(ro_binds, env, disk)
    # as root (D2LITE_SANDBOX=rootless), root mapped to an ordinary uid inside: a user namespace
    # whose uid 0 has no capability cannot map its own children's
    ids = ["--uid", "1000", "--gid", "1000"] if os.geteuid() == 0 else []
    # the sandbox's root and /dev belong to the mapped uid, which is also the student's: read-only,
    # or one notebook could leave files there (/etc/ld.so.preload) for every later one on this server
    # (found by attacking it); only the private tmpfs mounts stay writable, as in the root sandbox
    return ["bwrap", "--unshare-user", *ids, "--cap-drop", "ALL", *args[1:],
            "--remount-ro", "/dev", "--remount-ro", "/", "--"]


def _bwrap_common(ro_binds: list[Path], env: dict[str, str], disk: int) -> list[str]:
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", "--clearenv",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--ro-bind-try", "/etc/passwd", "/etc/passwd", "--ro-bind-try", "/etc/group", "/etc/group",
            "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(disk), "--tmpfs", "/dev/shm",
            "--mqueue", "/dev/mqueue",
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
    args += ["--chdir", "/home/student"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def _Cgroup(limits: Limits, processes: int | None) -> cgroups.Cgroup:
    """A cgroup for one sandbox (memory capped at ``limits.memory``, ``processes`` tasks or none),
    from the backend this machine has (cgroups.detect: v1 or v2)."""
    return backend().create(limits.memory, processes)


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


class Warm:
    """A warm sandbox: one bubblewrap sandbox holding a fork server (zygote.py) with torch, d2lite
    and the data set loaded, from which each notebook starts as a fresh child in a cgroup of its own.

    The server runs as root inside the sandbox with only CAP_SETUID/CAP_SETGID/CAP_SETPCAP (to drop
    each child to `nobody` with an empty bounding set) and never runs student code; it is in a cgroup of its own, capped like a notebook.
    One notebook at a time; use one Warm per worker thread.
    """

    def __init__(self, ro_binds: list[Path], env: dict[str, str], limits: Limits = Limits(),
                 modules: list[str] = (), start_timeout: float = 180.0) -> None:
        self.limits = limits
        self.cgroup = _Cgroup(limits, processes=max(limits.processes, 256))
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log = b""
        self.proc = None
        try:
            uid, gid = (65534, 65534) if ROOTLESS else _nobody()
            env = {**env, "D2LITE_ZYGOTE_FD": str(theirs.fileno())}
            self.proc = subprocess.Popen(
                _bwrap_args(ro_binds, env, limits.disk, drop=False)
                + [sys.executable, "-I", "-m", "d2lite.grading.zygote"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=self.cgroup.join, pass_fds=(theirs.fileno(),), close_fds=True)
            theirs.close()
            threading.Thread(target=self._drain, daemon=True).start()
            checker_uid, checker_gid = (None, None) if ROOTLESS else checker_ids()
            self.sock.sendall(json.dumps({"uid": uid, "gid": gid, "cpu": limits.cpu,
                                          "checker_uid": checker_uid, "checker_gid": checker_gid,
                                          "rootless": ROOTLESS,
                                          "file_size": limits.file_size,
                                          "modules": sorted(modules),
                                          # read-only binds may lie under /tmp (a checkout in /tmp):
                                          # the wipe leaves them and their parents alone
                                          "keep": sorted({str(Path(b).resolve()) for b in ro_binds})}).encode()
                              + b"\n")
            self.sock.settimeout(start_timeout)
            self._buffer = b""
            ready = self._receive().get("ready")
            self.pid = self._host_pid(ready)
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:  # the server's own diagnostics, kept (bounded) for error messages
        for line in iter(self.proc.stdout.readline, b""):
            self.log = (self.log + line)[-8192:]

    def _receive(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise SandboxUnavailable("the warm sandbox's server ended: "
                                         + self.log.decode(errors="replace")[-2000:])
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _host_pid(self, inner: int) -> int:
        """The server's pid as the host sees it (it reported the one of its PID namespace)."""
        for pid in self.cgroup.procs():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) == 2 and int(nspid[1]) == inner:
                return pid
        raise SandboxUnavailable(f"the warm sandbox's server (pid {inner} inside) is not in its cgroup")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _fork(self, cgroup: "_Cgroup", role: str, fds: list[int]) -> int:
        """Fork one child of the server inside ``cgroup`` (the server enters it, forks, and leaves)."""
        cgroup.adopt(self.pid)
        try:
            self.sock.settimeout(60)
            socket.send_fds(self.sock, [b"F" + json.dumps({"role": role}).encode()], fds)
            forked = self._receive()
        finally:
            self.cgroup.adopt(self.pid)
        if "forked" not in forked or (ROOTLESS and role != "checker" and "runs" not in forked):
            raise SandboxUnavailable(f"the warm sandbox did not fork: {forked} "
                                     + self.log.decode(errors="replace")[-1500:])
        return forked

    def _wait(self, pids: list[int], timeout: float = 30) -> dict:
        self.sock.settimeout(timeout)
        socket.send_fds(self.sock, [b"W" + json.dumps({"pids": pids}).encode()], [])
        return self._receive().get("exit", {})

    def run(self, job: dict, limits: Limits | None = None) -> Outcome:
        """Run one notebook: a checker process (``job`` as JSON on its stdin, records on fd 3) and the
        student's oracle process, each in a cgroup of its own, connected by two pipes. Everything
        either started is killed when the checker ends, or at the wall clock or another cap, before
        this returns; then a cleaning child empties the private directories for the next notebook.
        A server that cannot be made clean is closed (the caller starts another)."""
        limits = limits or self.limits
        student = _Cgroup(limits, processes=None)
        checker = _Cgroup(limits, processes=None)
        ours, theirs = [], []
        killed: list[str] = []
        start = time.monotonic()
        pids: list[int] = []
        try:
            job_r, job_w = os.pipe()
            out_r, out_w = os.pipe()
            rec_r, rec_w = os.pipe()
            req_r, req_w = os.pipe()      # checker -> oracle
            rep_r, rep_w = os.pipe()      # oracle -> checker
            ours = [job_w, out_r, rec_r]
            theirs = [job_r, out_w, rec_w, req_r, req_w, rep_r, rep_w]
            pids.append(self._fork(checker, "checker", [job_r, out_w, rec_w, req_w, rep_r])["forked"])
            forked = self._fork(student, "student", [out_w, req_r, rep_w])
            pids.append(forked["forked"])
            # rootless: the notebook runs in a PID namespace of its own, one process below the forked one
            job = json.dumps({**job, "oracle_pid": forked.get("runs", forked["forked"])}).encode()
            for fd in theirs:
                os.close(fd)
            theirs = []
            student.set_processes(limits.processes)
            checker.set_processes(CHECKER_PROCESSES)

            def over(what):
                def kill():
                    killed.append(what)
                    student.kill_all()
                    checker.kill_all()
                return kill

            out_sink, rec_sink = {}, {}
            job_file, out, rec = (os.fdopen(fd, how) for fd, how in zip(ours, ("wb", "rb", "rb")))
            ours = []
            readers = [threading.Thread(target=_reader, args=(out, limits.output, 1 << 20, out_sink,
                                                               over("output")), daemon=True),
                       threading.Thread(target=_reader, args=(rec, limits.records, limits.records,
                                                               rec_sink, over("records")), daemon=True)]
            for t in readers:
                t.start()

            def feed():
                try:
                    job_file.write(job)
                except (BrokenPipeError, OSError):
                    pass
                finally:
                    try:
                        job_file.close()
                    except OSError:
                        pass
            threading.Thread(target=feed, daemon=True).start()
            readers[1].join(timeout=limits.wall)  # the records end when the checker ends
            if readers[1].is_alive():
                killed.append("timeout")
            else:  # the checker said goodbye: the oracle exits on its own, unless something of it stays
                grace = time.monotonic() + 2
                while student.procs() and time.monotonic() < grace:
                    time.sleep(0.01)
            leftover = student.kill_all()
            checker.kill_all()
            codes = self._wait(pids)
            for t in readers:
                t.join(timeout=10)
            seconds = time.monotonic() - start
            if not killed and student.oom_killed():
                killed.append("memory")
            returncode = codes.get(str(pids[1]))
            checker_code = codes.get(str(pids[0]))
            notes = [] if killed or checker_code == 0 else [f"the checker ended with status {checker_code}"]
            if student.procs() or checker.procs():  # survivors of a fork race: the server's PID namespace goes with them
                self.close()
            elif returncode == DIRTY:  # the notebook did not start: the caller runs it on a new server
                self.close()
                return Outcome(returncode=None, records=b"", output=out_sink.get("data", b""), output_bytes=0,
                               seconds=seconds, peak_memory=0,
                               notes=["the warm sandbox's private directories could not be emptied"])
            elif not self.clean(limits):
                self.close()  # the next notebook gets a fresh server instead
            return Outcome(returncode=returncode, records=rec_sink.get("data", b""),
                           output=out_sink.get("data", b""), output_bytes=out_sink.get("total", 0),
                           seconds=seconds, peak_memory=student.peak(), killed=killed[0] if killed else None,
                           leftover=leftover, notes=notes)
        except (OSError, ValueError, SandboxUnavailable) as error:
            self.close()  # a server that lost track is never reused; the caller starts another
            student.kill_all()
            checker.kill_all()
            return Outcome(returncode=None, records=b"", output=f"the warm sandbox failed: {error}".encode(),
                           output_bytes=0, seconds=time.monotonic() - start, peak_memory=student.peak(),
                           notes=[f"the warm sandbox failed: {error}"])
        finally:
            for fd in ours + theirs:
                try:
                    os.close(fd)
                except OSError:
                    pass
            for cgroup in (student, checker):
                cgroup.kill_all()
                cgroup.remove()

    def clean(self, limits: Limits) -> bool:
        """Empty the private directories (as `nobody`, in a child of their own) for the next notebook."""
        cgroup = _Cgroup(Limits(memory=limits.memory, processes=8), processes=None)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        rec_r, rec_w = os.pipe()
        mine, child = [stdin_w, out_r, rec_r], [stdin_r, out_w, rec_w]
        try:
            pid = self._fork(cgroup, "clean", child)["forked"]
            for fd in child:
                os.close(fd)
            child = []
            cgroup.set_processes(8)
            return self._wait([pid], timeout=120).get(str(pid)) == 0
        except (OSError, ValueError, SandboxUnavailable, TimeoutError, socket.timeout):
            return False
        finally:
            for fd in mine + child:
                os.close(fd)
            cgroup.kill_all()
            cgroup.remove()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.cgroup.kill_all()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self.cgroup.kill_all()
        self.cgroup.remove()

    def __enter__(self) -> "Warm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
