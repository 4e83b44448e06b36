"""Inside the sandbox: a warm fork server; each notebook runs as two fresh forks of it.

The server (root inside bubblewrap, with only CAP_SETUID/CAP_SETGID/CAP_SETPCAP) imports torch,
d2lite, IPython and the assignment's own imports and decodes Fashion-MNIST once, then never runs
student code. For each notebook the grader asks for two children, each in a cgroup of its own: the
checker (checker.py; a uid of its own) and the student's oracle (oracle.py; `nobody`, after wiping
the private directories a previous notebook may have left files in). Each drops every capability,
sets no_new_privs and starts its own session. A request is ``F`` + {"role": ...} with the child's
pipe ends (SCM_RIGHTS); the server replies ``forked``. ``W`` + {"pids": [...]} waits for children and
replies their ``exit`` statuses. Every child is a copy of the same untouched server, so no student
sees another's state.
"""
from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import traceback

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PRIVATE_DIRS = ("/home/student", "/tmp", "/dev/shm", "/dev/mqueue")
DIRTY = 75  # sandbox.DIRTY: the private directories could not be emptied; the grader starts a new server


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _readline(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _preload(modules: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401

    from d2lite import data
    from d2lite.grading import checker, oracle, transport  # noqa: F401

    for name in modules:  # the reference notebooks' own imports (the instructor's, not a student's)
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 — a notebook that needs it will say so itself
            pass
    try:  # the decoded data set, shared copy-on-write by every child (lru_cache in d2lite.data)
        root = data.data_root()
        for train in (True, False):
            data._load_split(root, train, None)
    except Exception:  # noqa: BLE001 — no data here: the notebooks that need it fail on their own
        pass
    _warm_up()


def _warm_up() -> None:
    """What every notebook's first steps would pay for again: a LeNet step (kernels, autograd) and
    a drawn figure (fonts). Trusted code; the state it leaves is the library's own caches."""
    import matplotlib.pyplot as plt
    import torch

    import d2lite

    rng = torch.get_rng_state()
    try:
        for norm in (None, "d2lite"):
            net = d2lite.lenet(norm=norm)
            loss = torch.nn.functional.cross_entropy(net(torch.rand(8, 1, 28, 28)), torch.arange(8))
            loss.backward()
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], label="warm-up")
        ax.set_title("warm-up")
        ax.legend()
        fig.canvas.draw()
        plt.close(fig)
    except Exception:  # noqa: BLE001 — only a speed-up
        pass
    torch.set_rng_state(rng)  # every child starts from the random state of a fresh interpreter


def _kept(path: str, keep: list[str]) -> bool:
    """Whether ``path`` is one of the sandbox's read-only binds or a directory on the way to one."""
    return any(k == path or k.startswith(path.rstrip("/") + "/") for k in keep)


def _leftovers(directory: str, keep: list[str]) -> list[str]:
    return [e.path for e in os.scandir(directory) if not _kept(e.path, keep)]


def _wipe(directory: str, keep: list[str] = ()) -> None:
    """Remove everything in ``directory`` (as its owner, `nobody`: entries chmod-ed first), except
    the read-only binds in ``keep`` and their parents (root's, and not writable by `nobody`)."""
    for entry in os.scandir(directory):
        path = entry.path
        if _kept(path, keep):
            continue
        if entry.is_dir(follow_symlinks=False):
            for root, dirs, _files in os.walk(path):
                for d in dirs:
                    full = os.path.join(root, d)
                    if not os.path.islink(full):
                        try:
                            os.chmod(full, stat.S_IRWXU)
                        except OSError:
                            pass
            try:
                os.chmod(path, stat.S_IRWXU)
            except OSError:
                pass
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _capabilities() -> bool:
    """Whether this process holds or could regain any capability (permitted, effective, ambient, bounding)."""
    return any(int(v, 16) for v in _cap_fields().values())


def _drop(uid: int, gid: int, config: dict) -> None:
    """Rlimits, an empty bounding set, then from root to ``uid`` with no capability left."""
    for res, value in ((resource.RLIMIT_CPU, config["cpu"]), (resource.RLIMIT_FSIZE, config["file_size"]),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 1024)):
        resource.setrlimit(res, (value, value))
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # an empty bounding set, as setpriv --bounding-set=-all leaves it
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # the kernel clears every capability
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.getuid() == 0 or os.geteuid() == 0 or _capabilities():
        raise RuntimeError("the child kept root or a capability")


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x4000, 0x40000, 0x2, 0x4, 0x8
PR_SET_DUMPABLE, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 4, 47, 4
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
NOBODY = 65534


def _limits(config: dict) -> None:
    for res, value in ((resource.RLIMIT_CPU, config["cpu"]), (resource.RLIMIT_FSIZE, config["file_size"]),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 1024)):
        resource.setrlimit(res, (value, value))


def _no_capabilities(libc) -> None:
    """Drop every capability this process holds (bounding, ambient, then permitted/effective/
    inheritable with capset), set no_new_privs, and check that none is left."""
    import platform

    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: checked below
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    number = SYS_CAPSET.get(platform.machine())
    if number is None or libc.syscall(number, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _drop_rootless_checker(config: dict) -> None:
    """Rootless: the checker keeps the sandbox's uid (one uid is mapped) with no capability, and is
    not dumpable, so that no process of the same uid without capabilities in this user namespace can
    read its memory or its /proc files; the student's process, in a PID namespace of its own below,
    cannot name it to signal or trace it."""
    _limits(config)
    libc = ctypes.CDLL(None, use_errno=True)
    _no_capabilities(libc)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    fields = _cap_fields()
    if any(int(fields[k], 16) for k in ("CapPrm", "CapEff", "CapAmb")):
        raise RuntimeError("the checker kept a capability")


def _cap_fields() -> dict:
    with open("/proc/self/status") as fh:
        return dict(line.split(":", 1) for line in fh if line.startswith(("CapPrm", "CapEff", "CapAmb", "CapBnd")))


def _isolate_rootless(config: dict, report: int) -> None:
    """Rootless: the student's process (or the cleaner) in a user, mount and PID namespace of its
    own, as `nobody` there with no capability. This process unshares and forks that namespace's
    init, which forks the process that goes on; this one writes that process's pid (as the server
    sees it: the checker reads its memory) to ``report``, waits for the init and exits with its
    status. Neither it nor the init runs student code; the init has no capability, is not dumpable,
    and exits with the notebook's process (the kernel then kills what is left in the namespace)."""
    _limits(config)
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(user, PID namespaces)")
    # the server made itself not dumpable, and so is this fork of it; older kernels (Debian 12's
    # 6.1) then give its /proc/self files to the global root, and writing the maps is refused: it is
    # dumpable only while it writes them (no student code runs yet), then not again
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{NOBODY} {uid} 1"), ("gid_map", f"{NOBODY} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    ready_r, ready_w = os.pipe()
    init = os.fork()
    if init:
        code = 70
        try:
            os.close(ready_w)
            os.read(ready_r, 1)  # the init has forked the notebook's process
            os.write(report, f"{_child_of(init)}\n".encode())
            os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            code = _exit_code(os.waitpid(init, 0)[1])
        finally:
            os._exit(code)
    os.close(report)
    os.close(ready_r)
    if libc.unshare(CLONE_NEWNS) != 0:  # a mount namespace of the init's own: the outer's /proc stays the server's
        raise OSError(ctypes.get_errno(), "unshare(mount namespace)")
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    # /proc of the new PID namespace (refused where the sandbox's /proc has read-only overmounts:
    # the old one then shows pids of the server's namespace, which this namespace cannot signal)
    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    notebook = os.fork()
    if notebook:  # the init: reap, and end with the notebook's process
        code = 70
        try:
            _no_capabilities(libc)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            os.write(ready_w, b"x")
            os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            while True:
                pid, status = os.wait()
                if pid == notebook:
                    code = _exit_code(status)
                    break
        finally:
            os._exit(code)
    os.close(ready_w)
    _no_capabilities(libc)
    if os.getuid() != NOBODY or _capabilities():
        raise RuntimeError("the student's process kept a capability")


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _child_of(parent: int) -> int:
    """The pid (in this PID namespace) of ``parent``'s one child."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                return int(entry)
    raise RuntimeError(f"no child of {parent}")


def _child(fds: list[int], config: dict, role: str, report: int | None = None) -> None:
    """One process of a notebook: ``student`` (the oracle: fds out, requests, answers), ``checker``
    (the test cells: fds job, out, records, to the oracle, from the oracle) or ``clean`` (empties the
    private directories between notebooks: fds stdin, out, records)."""
    code = 70
    try:
        os.setsid()
        layout = {"student": (1, 3, 4), "checker": (0, 1, 3, 4, 5), "clean": (0, 1, 3)}[role]
        if len(fds) != len(layout):
            raise RuntimeError(f"{role}: {len(fds)} file descriptors, expected {len(layout)}")
        if report is not None:  # kept (above the others) until the notebook's process reports its pid
            kept = fcntl.fcntl(report, fcntl.F_DUPFD, 200)
            os.close(report)
            report = kept
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of the targets first
        for fd in fds:
            os.close(fd)
        if 0 not in layout:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        for fd, target in zip(moved, layout):
            os.dup2(fd, target)
        os.dup2(1, 2)  # stderr joins stdout (one capped stream)
        if report is None:
            os.closerange(max(layout) + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        else:
            os.closerange(max(layout) + 1, report)
            os.closerange(report + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        if role == "checker":
            if config.get("rootless"):
                _drop_rootless_checker(config)
            else:
                _drop(config["checker_uid"], config["checker_gid"], config)
            os.chdir("/")
            os.environ["HOME"] = "/nonexistent"
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            from d2lite.grading import checker

            code = checker.main()
            return
        if config.get("rootless"):
            _isolate_rootless(config, report)
        else:
            _drop(config["uid"], config["gid"], config)
        for directory in PRIVATE_DIRS:
            try:
                _wipe(directory, config.get("keep", []))
            except (OSError, RecursionError):
                pass
        if any(len(open(f"/proc/sysvipc/{kind}").readlines()) > 1 for kind in ("shm", "sem", "msg")):
            subprocess.run(["ipcrm", "--all"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if any(os.path.isdir(d) and _leftovers(d, config.get("keep", [])) for d in PRIVATE_DIRS):
            code = DIRTY  # what a previous notebook left cannot be removed: never run on top of it
            return
        if role == "clean":
            code = 0
            return
        os.chdir("/home/student")
        os.environ["HOME"] = "/home/student"
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        from d2lite.grading import oracle

        code = oracle.main()
    except BaseException:  # noqa: BLE001
        try:
            os.write(2, traceback.format_exc().encode()[-4000:])
            if os.environ.get("D2LITE_ZYGOTE_DEBUG"):
                os.write(int(os.environ["D2LITE_ZYGOTE_DEBUG"]), traceback.format_exc().encode()[-4000:])
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> int:
    sock = socket.socket(fileno=int(os.environ.pop("D2LITE_ZYGOTE_FD")))
    config = json.loads(_readline(sock))
    if config.get("rootless"):  # the same uid as the notebooks' processes: no /proc/<pid>/mem, environ, fd of it
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _preload(config.get("modules", []))
    for directory in PRIVATE_DIRS:  # caches the imports wrote (fontconfig, matplotlib): no child sees them
        _wipe(directory, config.get("keep", []))
    _send(sock, {"ready": os.getpid()})
    while True:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 8)
        except OSError:
            return 0
        if not msg:
            return 0
        kind, header = msg[:1], json.loads(msg[1:] or b"{}")
        if kind == b"W":  # wait for children forked before, by pid
            codes = {}
            for pid in header.get("pids", []):
                try:
                    _, status = os.waitpid(pid, 0)
                    codes[str(pid)] = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    codes[str(pid)] = None
            _send(sock, {"exit": codes})
            continue
        if kind != b"F" or header.get("role") not in ("student", "checker", "clean"):
            for fd in fds:
                os.close(fd)
            return 0
        inner = config.get("rootless") and header["role"] != "checker"
        report_r, report_w = os.pipe() if inner else (None, None)
        pid = os.fork()
        if pid == 0:
            os.close(sock.detach())
            if inner:
                os.close(report_r)
            _child(fds, config, header["role"], report_w)
        for fd in fds:
            os.close(fd)
        reply = {"forked": pid}
        if inner:  # the process that runs the notebook: pid 1 of its own namespace, this pid here
            os.close(report_w)
            with os.fdopen(report_r, "rb") as fh:
                line = fh.readline().strip()
            if line.isdigit():
                reply["runs"] = int(line)
        _send(sock, reply)


if __name__ == "__main__":
    sys.exit(main())
