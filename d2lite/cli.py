"""The ``d2lite`` command: ``d2lite compare`` trains LeNet with and without batch norm (in one
process, or data-parallel on CPU processes); ``d2lite grade`` grades an nbgrader assignment's
submissions in sandboxes."""
from __future__ import annotations

import argparse
import sys
from collections import namedtuple
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import load_fashion_mnist
from .experiments import Results
from .models import lenet
from .train import train, try_gpu

# name -> (builder, the chapter's learning rate)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "lenet": (lambda: lenet(), 0.9),
    "lenet_bn": (lambda: lenet(norm="d2lite"), 1.0),
    "lenet_bn_torch": (lambda: lenet(norm="torch"), 1.0),
    "lenet_bn_nobias": (lambda: lenet(norm="d2lite", bias=False), 1.0),
    "lenet_dropout": (lambda: lenet(dropout=0.5), 0.9),
}
Setting = namedtuple("Setting", ["lr", "batch_size"])
# with --processes N > 1: also the process count and whose statistics batch norm uses
DistributedSetting = namedtuple("DistributedSetting", ["lr", "batch_size", "processes", "batch_norm"])


def _learning_rates(specs: list[str], networks: list[str]) -> dict[str, float]:
    rates = {name: NETWORKS[name][1] for name in networks}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            raise SystemExit(f"--lr takes VALUE or NETWORK=VALUE, got {spec!r}") from None
        if not lr > 0:
            raise SystemExit(f"--lr must be positive, got {spec!r}")
        if sep and name not in rates:
            raise SystemExit(f"--lr names {name!r}, which is not among --nets {networks}")
        for target in ([name] if sep else rates):
            rates[target] = lr
    return rates


def compare(args: argparse.Namespace) -> Results:
    networks = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown or not networks:
        raise SystemExit(f"--nets: unknown {unknown}; choose from {', '.join(NETWORKS)}")
    rates = _learning_rates(args.lr, networks)
    processes = args.processes
    _check_processes(args)
    if processes > 1:
        device = torch.device("cpu")
        results = Results(params=DistributedSetting._fields)
        bn = "local" if args.local_bn else "sync"
    else:
        device = torch.device(args.device) if args.device else try_gpu()
        results = Results(params=Setting._fields)
    train_iter, test_iter = load_fashion_mnist(args.batch_size, subset=args.subset,
                                               test_subset=args.test_subset, seed=args.seed,
                                               device=device)
    if processes > 1:
        _check_last_batch(args, train_iter.num_examples)
    out = Path(args.out)
    for name in networks:
        torch.manual_seed(args.seed)
        if processes == 1:
            print(f"== {name}: lr {rates[name]}, batch size {args.batch_size}, {args.epochs} epochs "
                  f"on {device}")
            history = train(NETWORKS[name][0](), train_iter, test_iter, args.epochs, rates[name],
                            device, name=name, animate=False, progress=args.progress)
            results.add(history, network=name, run=Setting(rates[name], args.batch_size))
            continue
        print(f"== {name}: lr {rates[name]}, batch size {args.batch_size} "
              f"({args.batch_size / processes:g} a process), {args.epochs} epochs on {processes} "
              f"CPU processes, {'local' if args.local_bn else 'synchronized'} batch norm")
        from .distributed import DistributedError, train_distributed
        try:
            history = train_distributed(NETWORKS[name][0](), train_iter, test_iter, args.epochs,
                                        rates[name], processes=processes,
                                        sync_bn=not args.local_bn, name=name)
        except DistributedError as error:
            raise SystemExit(f"d2lite compare: {name} on {processes} processes failed: {error}") from None
        results.add(history, network=name,
                    run=DistributedSetting(rates[name], args.batch_size, processes, bn))
    print()
    print(results.format())
    csv_path = results.to_csv(out / "compare.csv")
    from .plot import plot_histories
    png_path = out / "compare.png"
    title = f"Fashion-MNIST, batch size {args.batch_size}"
    if processes > 1:
        title += f" on {processes} processes, {'local' if args.local_bn else 'sync'} BN"
    plot_histories(results.histories, path=png_path, title=title)
    print(f"\nwrote {csv_path} and {png_path}")
    return results


def _check_processes(args: argparse.Namespace) -> None:
    """--processes/--local-bn against the other options: SystemExit with the reason."""
    if args.local_bn and args.processes == 1:
        raise SystemExit("--local-bn needs --processes 2 or more (one process always normalizes "
                         "with the statistics of the whole batch)")
    if args.processes == 1:
        return
    if args.device and torch.device(args.device).type != "cpu":
        raise SystemExit(f"--processes {args.processes} trains on CPU processes (gloo); "
                         f"--device {args.device} is for one process")
    least = _least_per_process(args)
    if args.batch_size < least * args.processes:
        raise SystemExit(f"--batch-size {args.batch_size} is split over --processes "
                         f"{args.processes}: each process needs at least {least} example(s) of every "
                         f"batch (batch size >= {least * args.processes})")


def _least_per_process(args: argparse.Namespace) -> int:
    # local batch norm needs 2 values per channel (the (N, 120) layer); synchronized, 1 a process
    return 2 if args.local_bn else 1


def _check_last_batch(args: argparse.Namespace, examples: int) -> None:
    last, least = examples % args.batch_size, _least_per_process(args)
    if 0 < last < least * args.processes:
        raise SystemExit(f"the last batch of an epoch has {last} of the {examples} training "
                         f"examples, too few to split over --processes {args.processes} (at least "
                         f"{least} a process): choose another --subset or --batch-size")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2lite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare", help="train networks side by side and tabulate them",
        description="Train the chapter's networks on Fashion-MNIST (default: LeNet at lr 0.9 and "
                    "LeNet with batch norm at lr 1.0, batch size 256, 10 epochs, as d2l §8.5), "
                    "print each run's closing lines and the run table, write CSV and a PNG plot.")
    cmp.add_argument("--nets", default="lenet,lenet_bn",
                     help=f"comma-separated networks among: {', '.join(NETWORKS)}")
    cmp.add_argument("--epochs", type=_positive_int, default=10)
    cmp.add_argument("--batch-size", type=_positive_int, default=256)
    cmp.add_argument("--lr", action="append", default=[], metavar="[NET=]VALUE",
                     help="learning rate for all networks, or NET=VALUE for one (repeatable); "
                          "default: 0.9 without batch norm, 1.0 with")
    cmp.add_argument("--subset", type=_positive_int, default=None,
                     help="train on this many examples (default: all 60,000)")
    cmp.add_argument("--test-subset", type=_positive_int, default=None)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best there is)")
    cmp.add_argument("--out", default="results", help="directory for compare.csv and compare.png")
    cmp.add_argument("--no-progress", dest="progress", action="store_false",
                     help="hide the progress bar")
    cmp.add_argument("--processes", type=_positive_int, default=1,
                     help="train each network data-parallel (DDP over gloo) on this many CPU "
                          "processes, each its slice of every batch of --batch-size (default 1: "
                          "one process, on --device; no progress bar with more)")
    cmp.add_argument("--local-bn", action="store_true",
                     help="with --processes > 1: each process normalizes with its own slice's "
                          "statistics (default: batch norm synchronized over the processes)")
    grd = commands.add_parser(
        "grade", help="grade submissions of an nbgrader assignment, safely",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=GRADE_HELP)
    grd.add_argument("assignment", nargs="?", help="the assignment, e.g. batch_norm")
    grd.add_argument("--check", action="store_true",
                     help="print what this machine offers the sandbox (cgroup v1 or v2, root, bubblewrap), "
                          "what the grader will use and the caps (with --memory, --timeout, ...) it would "
                          "put on each notebook, then exit (status 1 if it cannot grade here)")
    grd.add_argument("--student", action="append", default=[], metavar="ID",
                     help="grade only this student (repeatable; default: everyone in submitted/)")
    grd.add_argument("--notebook", action="append", default=[], metavar="NAME",
                     help="grade only this notebook, e.g. 00_from_scratch (repeatable; default: all)")
    grd.add_argument("--course", default=".", help="the nbgrader course directory (default: here)")
    grd.add_argument("--memory", type=_size, default="4G", help="memory cap per notebook (default 4G)")
    grd.add_argument("--timeout", type=_positive_int, default=300,
                     help="wall-clock seconds per notebook (default 300)")
    grd.add_argument("--cpu", type=_positive_int, default=600, help="CPU seconds per process (default 600)")
    grd.add_argument("--processes", type=_positive_int, default=64,
                     help="processes and threads per notebook (default 64)")
    grd.add_argument("--output", type=_size, default="8M",
                     help="stdout+stderr per notebook before it is stopped (default 8M)")
    grd.add_argument("--report", default=None, help="CSV report path (default reports/ASSIGNMENT.csv)")
    grd.add_argument("--refresh-reference", action="store_true",
                     help="check again that the reference solutions pass every test, even if checked before")
    grd.add_argument("--workers", type=_positive_int, default=None,
                     help="notebooks graded at once on this machine (default: the number of cores)")
    grd.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                     help="grade on this Dask cluster instead (needs the [cluster] extra; every worker "
                          "machine needs the sandbox's features); the gradebook stays here")
    grd.add_argument("--force", action="store_true",
                     help="grade again notebooks already graded from the same submission")
    grd.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                     help="hide the progress bar (shown on a terminal)")
    args = parser.parse_args(argv)
    if args.command == "grade":
        from .grading.errors import GradingError
        from .grading.runner import grade
        from .grading.sandbox import Limits, SandboxUnavailable

        limits = Limits(memory=args.memory, wall=float(args.timeout), cpu=args.cpu,
                        processes=args.processes, output=args.output)
        if args.check:
            from .grading import sandbox

            lines = sandbox.describe(limits)
            print("\n".join(lines))
            return 0 if lines[-1].startswith("verdict: ready") else 1
        if not args.assignment:
            raise SystemExit("d2lite grade: name the assignment (e.g. `d2lite grade batch_norm`), or --check")
        try:
            if args.workers and args.scheduler:
                raise SystemExit("d2lite grade: --workers and --scheduler exclude each other (a Dask "
                                 "cluster's size is its workers' threads)")
            grade(Path(args.course), args.assignment, args.student or None, limits,
                  args.refresh_reference, Path(args.report) if args.report else None,
                  notebooks=args.notebook or None, workers=args.workers, scheduler=args.scheduler,
                  force=args.force, progress=args.progress)
        except (GradingError, SandboxUnavailable) as error:
            raise SystemExit(f"d2lite grade: {error}") from None
        return 0
    compare(args)
    return 0


GRADE_HELP = """\
Grade every submitted notebook under submitted/<student>/ASSIGNMENT/ of the nbgrader course in
--course: scores go to nbgrader's gradebook (the tables `nbgrader autograde` fills, so Formgrader,
manual grading, generate_feedback and export work as before), autograded notebooks to autograded/,
and a report (table and CSV: score, seconds, peak memory and the reason for anything zeroed or
flagged) to reports/ASSIGNMENT.csv.

How a grade is taken:
  * each notebook is rebuilt from the instructor's copy (test cells, points, grade ids, cell types,
    kernelspec from the gradebook and source/); only the answers are the student's;
  * it runs in its own sandbox as two processes: the student's (answer cells and setup; it never
    sees a test cell) answers requests with data, and a checker (another user) runs every test
    cell, computes the expected values and decides which tests pass; the reference solutions are
    checked once to pass every test (cached in .d2lite/reference/);
  * "does the work itself" tests run the student's function with library normalization
    unavailable and judge the values; the source policy reports reaching into the runtime, which
    costs those structural tests only.

The sandbox (bubblewrap + cgroup v1) needs: root, `bwrap`, `setpriv`, mount/PID/network/IPC/UTS
namespaces, the cgroup v1 memory and pids controllers, and the user `nobody`. Without any of them
the command refuses to run rather than grade unprotected. Each worker keeps one warm sandbox (torch,
d2lite and the data set loaded once); each notebook runs in a fresh fork of it as `nobody`, without
capabilities or network, seeing only /usr, Python, d2lite, the data set (read-only) and a private
home with the submission's own files; caps: memory, wall clock, CPU time, processes, output.

A class at a time: --workers N notebooks at once (default: one per core), or --scheduler to run
every (student, notebook) on a Dask cluster whose workers have the same sandbox features; the
gradebook is written by this process only. A run that is interrupted (Ctrl-C, killed) resumes:
the next run grades only notebooks not yet graded from the same submission, unless --force.

What a student can still do: decide what their own functions return (that is what is graded),
waste their own notebook's time and memory up to the caps, and read what is world-readable among
the mounted paths (Python, torch, d2lite, the data set). See the README for what remains reported
by the student's own process.
"""


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = str(text).strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G or 512M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
