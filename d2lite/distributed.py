"""Several processes on one machine: a launcher for torch.distributed (gloo over 127.0.0.1), and
data-parallel training (DDP) of the chapter's networks, with batch norm local or synchronized."""
from __future__ import annotations

import copy
import io
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.serialization import load as _torch_load

from .syncbn import convert_sync_batchnorm
from .history import EpochStats, History
from .train import init_xavier, train

__all__ = ["launch", "map_ranks", "grad_on_ranks", "DistributedError", "Shard", "train_distributed",
           "STUDENT_SIDE"]

# Set by d2lite grade's oracle (before any student code runs): called in each rank once the rank
# holds its own copies of its inputs, it wipes, in the rank's copy of memory only, what the grader
# sent the student's process (every rank's part, expected values of other tests). A rank then holds
# its own part and nothing else, as on separate machines, however it searches its memory.
_forget_in_rank: Callable[[], None] | None = None

# The functions here that run a caller's code in other processes. When d2lite grade's checker
# meets them in a test cell, it runs them in the student's process (the code they run is the
# student's; what they return comes back by value and is judged in the checker).
STUDENT_SIDE = ("launch", "map_ranks", "grad_on_ranks")


class DistributedError(RuntimeError):
    """A process started by :func:`launch` failed, died or did not finish in time."""


def launch(fn: Callable[..., Any], processes: int = 2, args: tuple = (), *, backend: str = "gloo",
           timeout: float = 300.0, threads: int | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``processes`` new processes joined in one
    ``torch.distributed`` process group, and return what each returned, in rank order.

    The processes are forked, so ``fn`` may be a function defined in a notebook; they meet through
    a file store in a private temporary folder (no port to choose, none that can be taken
    meanwhile), and gloo talks over the loopback interface only. Results come back by value
    (``torch.save``): tensors, numbers, dicts, modules' ``state_dict()``s.

    backend: ``"gloo"`` (CPU; the default) or ``"nccl"`` (one GPU a process; not on a fork).
    timeout: seconds the whole run may take; after that every process is killed and
        :class:`DistributedError` raised (a collective one rank never joins would wait forever).
    threads: intra-op threads per process (default: the cores shared out, at least 1).

    Raises :class:`DistributedError` with the failing rank's traceback if any process raises or
    dies; the others are then killed, so nothing is left waiting on a collective.
    """
    return _launch(fn, processes, args, None, backend, timeout, threads)


def _launch(fn, processes, args, select, backend="gloo", timeout=300.0, threads=None) -> list:
    """launch(); ``select(rank, args)``, if given, picks in each rank the arguments it gets (its own
    copies); every tensor in ``args`` is then wiped in that rank."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(rank, world_size, *args), got {fn!r}")
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise DistributedError("launch forks its processes, and this platform cannot fork "
                               "(on Windows, run the notebook in WSL2 or a Linux container)")
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    # the ranks meet through a file store (flock on a private temporary file): a TCPStore's client,
    # made in a child forked from a process with threads (a Jupyter kernel, a grader's oracle), hung
    # now and then in its constructor (1 launch in about 100 with two busy threads in the parent)
    folder = tempfile.mkdtemp(prefix="d2lite-ranks-")
    store_path = os.path.join(folder, "store")
    context = multiprocessing.get_context("fork")
    children, pipes = [], []
    try:
        for rank in range(processes):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_run_rank, daemon=True, name=f"d2lite-rank-{rank}",
                                    args=(fn, rank, processes, args, select, store_path, send,
                                          backend, threads, timeout))
            child.start()
            send.close()
            children.append(child)
            pipes.append(receive)
        return _collect(children, pipes, time.monotonic() + timeout)
    finally:
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
            child.join()
        for pipe in pipes:
            pipe.close()
        shutil.rmtree(folder, ignore_errors=True)


def map_ranks(fn: Callable[..., Any], shards, *args, groups=None, timeout: float = 120.0) -> list:
    """``fn(shards[r], *args)`` on rank r of ``len(shards)`` processes in one process group; the
    results in rank order. A tuple ``shards[r]`` gives several per-rank arguments:
    ``fn(*shards[r], *args)``. A quick way to try a function that communicates::

        d2lite.map_ranks(global_moments, X.split([3, 5]))   # two ranks, 3 and 5 examples

    groups: the ranks split into process groups (lists of ranks, each rank in one), e.g.
        ``[[0, 1], [2, 3]]``; each rank then gets its group as ``fn(..., group=its_group)`` and
        communicates within it only (two data-parallel jobs side by side).
    """
    shards = list(shards)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    groups = _check_groups(groups, len(shards))
    return _launch(_map_rank, len(shards), (fn, shards, args, groups), _map_select, timeout=timeout)


def _check_groups(groups, world: int):
    if groups is None:
        return None
    try:
        groups = [sorted(int(r) for r in g) for g in groups]
    except (TypeError, ValueError):
        raise ValueError(f"groups must be lists of ranks, got {groups!r}") from None
    flat = sorted(r for g in groups for r in g)
    if flat != list(range(world)) or not all(groups):
        raise ValueError(f"groups must split the ranks 0..{world - 1} (one group each, none empty), "
                         f"got {groups!r}")
    return groups


def _rank_group(rank: int, groups):
    """This rank's process group; every rank creates every group, in the same order."""
    mine = None
    for members in groups:
        handle = dist.new_group(members)
        if rank in members:
            mine = handle
    return mine


def _map_select(rank, args):
    fn, shards, rest, groups = args
    mine = shards[rank] if isinstance(shards[rank], tuple) else (shards[rank],)
    return fn, _own(mine), _own(rest), groups


def _map_rank(rank, world, fn, mine, args, groups):
    if groups is None:
        return fn(*mine, *args)
    return fn(*mine, *args, group=_rank_group(rank, groups))


def _own(x):
    """A rank's own copy of its part (tensors copied, in tuples, lists and dicts): a shard made by
    ``X.split`` is a view of X's storage, through which the rank could read the other ranks' parts
    (``untyped_storage()``, ``as_strided``) without communicating; as separate processes on separate
    devices, each rank holds only its part."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad and x.is_floating_point())
    if isinstance(x, (tuple, list)):
        return type(x)(_own(v) for v in x) if type(x) in (tuple, list) else x
    if type(x) is dict:
        return {k: _own(v) for k, v in x.items()}
    return x


def _wipe(x, seen=None) -> None:
    """Zero, in this process's memory, the storage of every tensor in ``x`` (after fork, the
    parent's copy is untouched; memory shared between processes is left alone)."""
    seen = set() if seen is None else seen
    if id(x) in seen:
        return
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        if not x.is_shared() and x.device.type == "cpu":
            with torch.no_grad():
                x.untyped_storage().fill_(0)
        if x.grad is not None:
            _wipe(x.grad, seen)
    elif isinstance(x, (tuple, list)):
        for v in x:
            _wipe(v, seen)
    elif isinstance(x, dict):
        for v in x.values():
            _wipe(v, seen)


def grad_on_ranks(fn: Callable[..., Any], shards, grad_outputs, *params, groups=None,
                  timeout: float = 120.0) -> list:
    """A forward and a backward pass of ``fn`` on each rank of ``len(shards)`` processes.

    Rank r computes ``Y = fn(X_r, *params)`` (the first element if ``fn`` returns a tuple) with
    ``X_r = shards[r]`` and its own leaf copies of the tensors in ``params``, all requiring
    gradients, then back-propagates ``(Y * grad_outputs[r]).sum()``. Returns, in rank order,
    ``(Y, X_r.grad, [grad of each tensor of params])``: the γ/β gradients of a batch norm are each
    rank's own, which data-parallel training then sums.

    groups: as for :func:`map_ranks`; each rank's group is then passed as the last positional
    argument, ``fn(X_r, *params, group)`` (``autograd.Function.apply`` takes no keywords).
    """
    shards, grad_outputs = list(shards), list(grad_outputs)
    if len(shards) != len(grad_outputs):
        raise ValueError(f"one grad_output a shard: got {len(shards)} shards and "
                         f"{len(grad_outputs)} grad_outputs")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    groups = _check_groups(groups, len(shards))
    return _launch(_grad_rank, len(shards), (fn, shards, grad_outputs, params, groups), _grad_select,
                   timeout=timeout)


def _grad_select(rank, args):
    fn, shards, grad_outputs, params, groups = args
    return fn, _own(shards[rank]), _own(grad_outputs[rank]), _own(tuple(params)), groups


def _grad_rank(rank, world, fn, X, grad_output, params, groups):
    X = X.requires_grad_()
    leaves = [p.detach().requires_grad_() if isinstance(p, torch.Tensor) and p.is_floating_point()
              else p for p in params]
    Y = fn(X, *leaves) if groups is None else fn(X, *leaves, _rank_group(rank, groups))
    Y = Y[0] if isinstance(Y, (tuple, list)) else Y
    (Y * grad_output).sum().backward()
    return Y.detach(), X.grad, [p.grad if isinstance(p, torch.Tensor) else None for p in leaves]


def _collect(children, pipes, deadline: float) -> list:
    results: list = [None] * len(children)
    pending = dict(enumerate(pipes))
    while pending:
        ready = wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise DistributedError(f"ranks {sorted(pending)} did not finish in time (a collective "
                                   "that not every rank joined waits forever)")
        for rank, pipe in list(pending.items()):
            if pipe not in ready:
                continue
            del pending[rank]
            try:
                message = pipe.recv_bytes()
            except EOFError:
                children[rank].join(1)
                raise DistributedError(f"rank {rank} died (exit code {children[rank].exitcode}) "
                                       "before returning") from None
            if message[:2] != b"ok":
                raise DistributedError(f"rank {rank} failed:\n{message[2:].decode(errors='replace')}")
            results[rank] = _torch_load(io.BytesIO(message[2:]), weights_only=False)
    return results


def _run_rank(fn, rank, world, args, select, store_path, pipe, backend, threads, timeout) -> None:
    """The body of a forked process: its own inputs, join the group, run ``fn``, send its result,
    exit."""
    try:
        if select is not None or _forget_in_rank is not None:
            mine = select(rank, args) if select is not None else _own(args)
            _wipe(args)
            args = mine
        if _forget_in_rank is not None:
            _forget_in_rank()
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        message = b"ok" + buffer.getvalue()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        message = b"er" + traceback.format_exc().encode()
    try:
        pipe.send_bytes(message)
        pipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)  # no atexit handlers of the parent's (pytest's, IPython's) in a forked child


class Shard:
    """This rank's part of every batch of ``loader``: batch k of the loader split in ``world``
    contiguous slices (``tensor_split``), slice ``rank`` of each. Every rank iterates the same
    global batches in the same order (same loader, same seed), so the union of the ranks' slices is
    exactly the batch one process would train on."""

    def __init__(self, loader: Iterable, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for X, y in self.loader:
            yield X.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]


def train_distributed(net: nn.Module, train_iter: Iterable, test_iter: Iterable, num_epochs: int,
                      lr: float, *, processes: int = 2, sync_bn: bool = True, name: str = "",
                      timeout: float = 3600.0, verbose: bool = True, **train_kwargs) -> History:
    """Data-parallel training of ``net`` on ``processes`` CPU processes (DDP over gloo), with each
    global batch of ``train_iter`` split between them: what :func:`d2lite.train` does in one.

    sync_bn: True converts every batch norm to :class:`d2lite.SyncBatchNorm` (statistics of the
        whole global batch, as in one process); False leaves each process its own statistics
        (DDP then copies rank 0's running statistics to the others at every forward pass).
    train_kwargs: passed to :func:`d2lite.train` (optimizer, scheduler, loss, ...); ``init`` is
        applied here, once, before the processes start, so that they all start from the same
        weights.

    ``net`` ends with the trained weights and running statistics (those of rank 0, equal on every
    rank). Returns the :class:`History` of the run: losses, accuracies and examples counted over
    all processes; the test set is split between them too.
    """
    init = train_kwargs.pop("init", init_xavier)
    for key in ("animate", "progress", "device", "callbacks"):
        if key in train_kwargs:
            raise TypeError(f"train_distributed does not take {key!r} (the processes train on the "
                            "CPU, without a live plot)")
    if init is not None:
        net.apply(init)
    model = convert_sync_batchnorm(copy.deepcopy(net)) if sync_bn else net
    history, state = launch(_train_rank, processes,
                            (model, train_iter, test_iter, num_epochs, lr, name, train_kwargs),
                            timeout=timeout)[0]
    net.load_state_dict(state)
    if verbose:
        print(f"{history.summary()} ({processes} processes, "
              f"{'synchronized' if sync_bn else 'local'} batch norm)")
    return history


def _train_rank(rank, world, model, train_iter, test_iter, num_epochs, lr, name, train_kwargs):
    # d2lite's convolutions hand back a (C_out, 1, k, k) weight gradient whose stride on the axis
    # of size 1 differs from DDP's bucket's: harmless (a size-1 axis), but DDP warns on stderr.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel(model)
    history = train(ddp, Shard(train_iter, rank, world), Shard(test_iter, rank, world), num_epochs,
                    lr, device="cpu", init=None, name=name, animate=False, progress=False,
                    verbose=False, callbacks=[_GlobalEpoch(test_iter, rank, world)], **train_kwargs)
    return (history, model.state_dict()) if rank == 0 else None


class _GlobalEpoch:
    """A :func:`d2lite.train` callback (on every rank) that turns the epoch's per-rank figures into
    the whole batch's: losses and accuracies weighted by the examples each rank saw."""

    def __init__(self, test_iter, rank: int, world: int) -> None:
        self.test_examples = sum(len(y.tensor_split(world)[rank]) for _, y in test_iter)

    def __call__(self, history: History) -> None:
        e = history.epochs[-1]
        n = float(e.num_examples)
        totals = torch.tensor([e.train_loss * n, e.train_acc * n, n,
                               e.test_acc * self.test_examples, float(self.test_examples)],
                              dtype=torch.float64)
        dist.all_reduce(totals)
        slowest = torch.tensor([e.train_seconds], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss, correct, seen, test_correct, test_seen = totals.tolist()
        history.epochs[-1] = EpochStats(
            epoch=e.epoch, train_loss=loss / seen, train_acc=correct / seen,
            test_acc=test_correct / test_seen, lr=e.lr, seconds=e.seconds, num_examples=int(seen),
            train_seconds=slowest.item(),
            examples_per_sec=seen / slowest.item() if slowest.item() else 0.0)
