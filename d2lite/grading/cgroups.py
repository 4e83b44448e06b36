"""Memory and process caps per sandbox, on cgroup v1 or v2, behind one interface.

``detect()`` looks at the machine once and returns the backend the grader will use:

- **v2** (the unified hierarchy: Ubuntu 22.04+, Debian 12, Fedora, RHEL 9, WSL2, Kubernetes nodes),
  found as nsjail's ``--detect_cgroupv2`` finds it: ``/sys/fs/cgroup`` is a cgroup2 file system
  (statfs magic ``0x63677270``), or it has ``cgroup.controllers``. The grader works inside the
  cgroup it was started in (``/proc/self/cgroup``'s ``0::`` line): that subtree must be delegated to
  it (root owns everything; ``systemd-run --scope -p Delegate=yes``, ``user@.service`` or a
  container with a private, writable cgroup namespace delegate one to a user). Because of v2's
  no-internal-processes rule it first moves itself into a leaf of its own
  (``d2lite-<pid>-grader``), then enables ``+memory +pids`` in the subtree (``cgroup.subtree_control``),
  as nsjail's ``cgroup2.cc`` does; each sandbox is a sibling leaf with ``memory.max``,
  ``memory.swap.max`` 0 and ``pids.max``, killed with ``cgroup.kill``; the peak comes from
  ``memory.peak`` and a memory kill from ``memory.events``' ``oom_kill``.
- **v1** (this project's machines): the ``memory`` and ``pids`` controllers' own hierarchies, a
  cgroup ``d2lite-<pid>-<id>`` in each; root only.

Nothing outside this module knows which one it is: the sandbox calls ``backend.create(limits...)``
and uses the :class:`Cgroup` it gets (``adopt``, ``join``, ``procs``, ``set_processes``,
``kill_all``, ``oom_killed``, ``peak``, ``remove``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import time
import uuid
from pathlib import Path

__all__ = ["Backend", "Cgroup", "CgroupUnavailable", "V1", "V2", "detect", "CGROUP2_SUPER_MAGIC"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP2_SUPER_MAGIC = 0x63677270
PREFIX = "d2lite-"


class CgroupUnavailable(RuntimeError):
    """No cgroup the grader may use: the message names what is missing."""


def _is_cgroup2(path: Path) -> bool:
    """statfs(path).f_type == CGROUP2_SUPER_MAGIC, as nsjail's --detect_cgroupv2 tests it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return (path / "cgroup.controllers").exists()
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64, f_type first
    if libc.statfs(str(path).encode(), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == CGROUP2_SUPER_MAGIC


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


class Cgroup:
    """One sandbox's cgroup. Subclasses: a pair of v1 cgroups, or one v2 cgroup."""

    name: str

    def set_processes(self, processes: int | None) -> None:
        raise NotImplementedError

    def adopt(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        raise NotImplementedError

    def join(self) -> None:  # in a child of ours, before exec
        self.adopt(os.getpid())

    def procs(self) -> list[int]:
        raise NotImplementedError

    def oom_killed(self) -> bool:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def _kill_switch(self) -> bool:
        return False

    def kill_all(self) -> int:
        """SIGKILL every process in the cgroup until none is left (forking is stopped first, so a
        fork loop cannot refill it); return how many were found."""
        found = len(self.procs())
        if found:
            try:
                self.set_processes(0)
            except OSError:
                pass
            self._kill_switch()
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
        raise NotImplementedError


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _stale(path: Path) -> bool:
    """A ``d2lite-<pid>-…`` cgroup whose grader (pid) is gone."""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and not Path(f"/proc/{pid}").exists()


class Backend:
    """Which cgroups the grader uses and how; ``detect()`` returns one."""

    version: int

    def missing(self) -> list[str]:
        """What this machine lacks for this backend (empty: usable)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def create(self, memory: int, processes: int | None) -> Cgroup:
        raise NotImplementedError

    def remove_stale(self) -> int:
        raise NotImplementedError


# --- cgroup v1 -------------------------------------------------------------------------------------

class _V1Cgroup(Cgroup):
    def __init__(self, memory_root: Path, pids_root: Path, memory_limit: int, processes: int | None) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.memory, self.pids = memory_root / self.name, pids_root / self.name
        self.memory.mkdir()
        self.pids.mkdir()
        _write(self.memory / "memory.limit_in_bytes", str(memory_limit))
        memsw = self.memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:
                _write(memsw, str(memory_limit))
            except OSError:
                pass
        move = self.memory / "memory.move_charge_at_immigrate"
        if move.exists():  # the fork server's pages stay charged to its own cgroup
            _write(move, "0")
        self.set_processes(processes)

    def set_processes(self, processes: int | None) -> None:
        _write(self.pids / "pids.max", "max" if processes is None else str(processes))

    def adopt(self, pid: int) -> None:
        _write(self.memory / "cgroup.procs", str(pid))
        _write(self.pids / "cgroup.procs", str(pid))

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
        return bool(kills and kills[0] > 0) or failcnt > 0

    def peak(self) -> int:
        try:
            return int((self.memory / "memory.max_usage_in_bytes").read_text())
        except OSError:
            return 0

    def remove(self) -> None:
        for path in (self.memory, self.pids):
            _rmdir(path)


class V1(Backend):
    """The cgroup v1 ``memory`` and ``pids`` controllers: as root, or in a cgroup of each that root
    made over to this user (``D2LITE_CGROUP_V1_SUBTREE``, a path relative to each controller's root,
    chowned to the user: v1's delegation)."""

    version = 1

    def __init__(self, root: Path = CGROUP_ROOT, subtree: str | None = None) -> None:
        self.root = root
        subtree = (os.environ.get("D2LITE_CGROUP_V1_SUBTREE", "") if subtree is None else subtree).strip("/")
        self.memory_root = root / "memory" / subtree if subtree else root / "memory"
        self.pids_root = root / "pids" / subtree if subtree else root / "pids"

    def missing(self) -> list[str]:
        missing = []
        if not (self.root / "memory" / "memory.limit_in_bytes").exists():
            missing.append(f"the cgroup v1 memory controller at {self.root / 'memory'}")
        if not (self.root / "pids" / "pids.max").exists() and not (self.root / "pids" / "cgroup.procs").exists():
            missing.append(f"the cgroup v1 pids controller at {self.root / 'pids'}")
        for where in (self.memory_root, self.pids_root):
            if not missing and not (os.access(where, os.W_OK) and os.access(where / "cgroup.procs", os.W_OK)):
                missing.append(f"write access to the cgroup v1 {where} (run as root, or have root make a cgroup "
                               "of the memory and of the pids controller over to you and name it in "
                               "D2LITE_CGROUP_V1_SUBTREE)")
        return missing

    def describe(self) -> str:
        return (f"cgroup v1: memory and pids controllers at {self.memory_root} and {self.pids_root}, "
                f"a cgroup {PREFIX}<pid>-<id> in each per sandbox (memory.limit_in_bytes, "
                "memory.memsw.limit_in_bytes where swap is accounted, pids.max)")

    def create(self, memory: int, processes: int | None) -> Cgroup:
        return _V1Cgroup(self.memory_root, self.pids_root, memory, processes)

    def remove_stale(self) -> int:
        removed = 0
        for controller in (self.memory_root, self.pids_root):
            if not controller.is_dir():
                continue
            for path in controller.glob(f"{PREFIX}*-*"):
                if not _stale(path):
                    continue
                try:
                    if not (path / "cgroup.procs").read_text().split():
                        path.rmdir()
                        removed += 1
                except OSError:
                    pass
        return removed


# --- cgroup v2 -------------------------------------------------------------------------------------

def _own_cgroup(mount: Path) -> Path:
    """The cgroup this process is in, as a directory under the v2 mount (``0::/path``)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = mount / line[3:].strip().lstrip("/")
            if own.name.startswith(PREFIX) and own.name.endswith("-grader"):
                return own.parent  # a grader's own leaf, inherited from it: its subtree is the one to use
            return own
    raise CgroupUnavailable("this process is in no cgroup v2 cgroup (/proc/self/cgroup has no 0:: line)")


class _V2Cgroup(Cgroup):
    def __init__(self, base: Path, memory_limit: int, processes: int | None) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path = base / self.name
        self.path.mkdir()
        try:
            _write(self.path / "memory.max", str(memory_limit))
            swap = self.path / "memory.swap.max"
            if swap.exists():  # no swap: the cap is the memory the notebook really has
                _write(swap, "0")
            self.set_processes(processes)
        except OSError:
            _rmdir(self.path)
            raise

    def set_processes(self, processes: int | None) -> None:
        _write(self.path / "pids.max", "max" if processes is None else str(processes))

    def adopt(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def _events(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in (line.split() for line in
                                           (self.path / "memory.events").read_text().splitlines())}
        except (OSError, ValueError):
            return {}

    def oom_killed(self) -> bool:
        # oom_kill: processes the OOM killer ended in this cgroup (not other kills: those do not count)
        return self._events().get("oom_kill", 0) > 0

    def peak(self) -> int:
        try:
            return int((self.path / "memory.peak").read_text())  # Linux 5.19+
        except (OSError, ValueError):
            try:
                return int((self.path / "memory.current").read_text())
            except (OSError, ValueError):
                return 0

    def _kill_switch(self) -> bool:
        kill = self.path / "cgroup.kill"  # Linux 5.14+: every process, atomically, forks included
        if not kill.exists():
            return False
        try:
            _write(kill, "1")
            return True
        except OSError:
            return False

    def remove(self) -> None:
        _rmdir(self.path)


class V2(Backend):
    """The unified hierarchy: sandboxes are leaves beside the grader's own leaf, inside the
    cgroup (delegated subtree) the grader was started in."""

    version = 2

    def __init__(self, mount: Path = CGROUP_ROOT, base: Path | None = None) -> None:
        self.mount = mount
        self._base = base
        self.prepared = False

    @property
    def base(self) -> Path:
        if self._base is None:
            self._base = _own_cgroup(self.mount)
        return self._base

    def missing(self) -> list[str]:
        try:
            base = self.base
        except (OSError, CgroupUnavailable) as error:
            return [f"a cgroup v2 cgroup of its own ({error})"]
        missing = []
        available = set()
        for where in (base, self.mount):
            try:
                available |= set((where / "cgroup.controllers").read_text().split())
                break
            except OSError:
                continue
        for controller in ("memory", "pids"):
            if controller not in available:
                missing.append(f"the cgroup v2 {controller} controller in {base} (cgroup.controllers lists "
                               f"{' '.join(sorted(available)) or 'none'}; the parent must delegate it)")
        if not os.access(base, os.W_OK) or not os.access(base / "cgroup.procs", os.W_OK) \
                or not os.access(base / "cgroup.subtree_control", os.W_OK):
            missing.append(f"write access to the cgroup v2 subtree {base} (run as root, or start the grader in a "
                           "delegated cgroup: `systemd-run --user --scope -p Delegate=yes d2lite grade …`, or a "
                           "container with a private, writable cgroup namespace)")
        return missing

    def describe(self) -> str:
        return (f"cgroup v2: the delegated subtree {self.base}; the grader moves itself into the leaf "
                f"{PREFIX}<pid>-grader, enables +memory +pids in cgroup.subtree_control, and gives each sandbox "
                "a leaf beside it (memory.max, memory.swap.max 0, pids.max; cgroup.kill, memory.peak, "
                "memory.events oom_kill)")

    def prepare(self) -> None:
        """Move this process into a leaf of its own and enable the memory and pids controllers for
        the subtree (a cgroup with processes in it cannot hand controllers to its children)."""
        if self.prepared:
            return
        base = self.base
        enabled = set((base / "cgroup.subtree_control").read_text().split())
        if not {"memory", "pids"} <= enabled:
            leaf = base / f"{PREFIX}{os.getpid()}-grader"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))  # the whole process, every thread
            try:
                _write(base / "cgroup.subtree_control", "+memory +pids")
            except OSError as error:
                others = (base / "cgroup.procs").read_text().split()
                if error.errno == errno.EBUSY and others:
                    raise CgroupUnavailable(
                        f"cannot enable the memory and pids controllers in {base}: other processes are in it "
                        f"({', '.join(others[:5])}), and cgroup v2 allows controllers only for a cgroup without "
                        "processes. Start the grader in a cgroup of its own (`systemd-run --scope -p "
                        "Delegate=yes d2lite grade …`)") from None
                raise CgroupUnavailable(f"cannot enable the memory and pids controllers in {base}: {error}") from None
        self.prepared = True

    def create(self, memory: int, processes: int | None) -> Cgroup:
        self.prepare()
        return _V2Cgroup(self.base, memory, processes)

    def remove_stale(self) -> int:
        """Remove what a killed grader left: its sandboxes' leaves (their processes killed first:
        with cgroup.kill nothing survives the grader's death for long) and its own leaf."""
        removed = 0
        try:
            base = self.base
            entries = list(base.glob(f"{PREFIX}*-*"))
        except (OSError, CgroupUnavailable):
            return 0
        for path in entries:
            if not path.is_dir() or not _stale(path):
                continue
            group = _V2Cgroup.__new__(_V2Cgroup)
            group.path, group.name = path, path.name
            if group.procs():
                group.kill_all()
            try:
                path.rmdir()
                removed += 1
            except OSError:
                pass
        return removed


def detect(mount: Path = CGROUP_ROOT) -> Backend:
    """The backend for this machine: v2 where ``mount`` is the unified hierarchy, else v1."""
    if _is_cgroup2(mount) or ((mount / "cgroup.controllers").exists()
                              and not (mount / "memory" / "memory.limit_in_bytes").exists()):
        return V2(mount)
    return V1(mount)
