"""Where notebooks run: N local worker threads or a Dask cluster, each worker thread with one warm
sandbox (created on first use). Tasks go in as data and come back as data."""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import sandbox
from .errors import GradingError

__all__ = ["execute", "close_sandboxes", "LocalWorkers", "DaskWorkers"]

_local = threading.local()
_warm_lock = threading.Lock()
_all_warm: list = []
_checked = False


def _environment() -> tuple[list[Path], dict[str, str]]:
    import d2lite
    from d2lite.data import data_root

    data = data_root()
    binds = [Path(sys.base_prefix), Path(sys.prefix), Path(d2lite.__file__).resolve().parent]
    if data.exists():
        binds.append(data)
    env = {"HOME": "/home/student", "PATH": "/usr/bin:/bin", "D2LITE_DATA": str(data),
           "NBGRADER_EXECUTION": "autograde", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    return binds, env


def _warm(limits: sandbox.Limits, modules: list[str]) -> sandbox.Warm:
    global _checked
    key = (limits, tuple(modules))
    warm = getattr(_local, "warm", None)
    if warm is not None and warm.alive and warm.key == key:
        return warm
    if warm is not None:
        warm.close()
    with _warm_lock:
        if not _checked:
            sandbox.check_features()
            _checked = True
    binds, env = _environment()
    warm = sandbox.Warm(binds, env, limits, modules)
    warm.key = key
    _local.warm = warm
    with _warm_lock:
        _all_warm.append(warm)
    return warm


def close_sandboxes() -> None:
    """End every warm sandbox this process started (their running notebooks with them)."""
    with _warm_lock:
        warms, _all_warm[:] = list(_all_warm), []
    for warm in warms:
        warm.close()


def execute(job: dict, limits: sandbox.Limits, modules: list[str]) -> dict:
    """Run one notebook's job in this worker's warm sandbox: the checker's records (bytes) and what
    the sandbox said (exit status, cap hit, seconds, peak memory, leftover processes, output tail)."""
    warm = _warm(limits, modules)
    outcome = warm.run(job, limits)
    if outcome.returncode is None and outcome.notes:  # the server itself failed: one retry on a new one
        warm = _warm(limits, modules)
        outcome = warm.run(job, limits)
    return {"records": outcome.records,
            "outcome": {"returncode": outcome.returncode, "killed": outcome.killed, "leftover": outcome.leftover,
                        "seconds": outcome.seconds, "peak_memory": outcome.peak_memory,
                        "output": outcome.output[-4000:].decode(errors="replace"), "notes": outcome.notes}}


class LocalWorkers:
    """N worker threads in this process, each with its own warm sandbox."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d2lite-grade")

    def prewarm(self, limits: sandbox.Limits, modules: list[str]) -> None:
        """Start every worker's warm sandbox now, while the coordinator reads the course."""
        barrier = threading.Barrier(self.workers)

        def start():
            try:
                barrier.wait(timeout=10)  # one start per worker thread
            except threading.BrokenBarrierError:
                pass
            try:
                _warm(limits, modules)
            except Exception:  # noqa: BLE001 — the first task reports it
                pass
        for _ in range(self.workers):
            self.pool.submit(start)

    def share(self, value):
        return value

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def as_completed(self, futures):
        from concurrent.futures import as_completed

        return as_completed(futures)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.pool.shutdown(wait=False, cancel_futures=True)  # queued tasks are dropped,
            close_sandboxes()  # running notebooks end with their sandboxes,
            self.pool.shutdown(wait=True)  # and their threads return
        else:
            self.pool.shutdown(wait=True)
            close_sandboxes()


class DaskWorkers:
    """An existing Dask distributed cluster: each task runs on a worker (in that worker's warm
    sandbox); a worker that dies has its tasks rerun elsewhere by the scheduler."""

    def __init__(self, address: str, timeout: float = 30) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise GradingError("--scheduler needs Dask: pip install -e \".[cluster]\" (dask and distributed)") from None
        try:
            self.client = Client(address, timeout=timeout)
        except OSError as error:
            raise GradingError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        self.workers = max(1, sum(self.client.nthreads().values()))

    def prewarm(self, limits: sandbox.Limits, modules: list[str]) -> None:
        pass  # each Dask worker thread starts its own on its first task, and keeps it between runs

    def share(self, value):
        # each task carries its notebook's context itself (tens of KiB): a task that depended on data
        # scattered to the workers could be cancelled when a worker holding it died ("already forgotten")
        return value

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def as_completed(self, futures):
        from distributed import as_completed

        return as_completed(futures)

    def close(self, cancel: bool = False) -> None:
        self.client.close()
