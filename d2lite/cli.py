"""The ``d2lite`` command: ``d2lite compare`` trains LeNet with and without batch norm."""
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
    device = torch.device(args.device) if args.device else try_gpu()
    train_iter, test_iter = load_fashion_mnist(args.batch_size, subset=args.subset,
                                               test_subset=args.test_subset, seed=args.seed,
                                               device=device)
    results = Results(params=Setting._fields)
    out = Path(args.out)
    for name in networks:
        print(f"== {name}: lr {rates[name]}, batch size {args.batch_size}, {args.epochs} epochs "
              f"on {device}")
        torch.manual_seed(args.seed)
        history = train(NETWORKS[name][0](), train_iter, test_iter, args.epochs, rates[name],
                        device, name=name, animate=False, progress=args.progress)
        results.add(history, network=name, run=Setting(rates[name], args.batch_size))
    print()
    print(results.format())
    csv_path = results.to_csv(out / "compare.csv")
    from .plot import plot_histories
    png_path = out / "compare.png"
    plot_histories(results.histories, path=png_path,
                   title=f"Fashion-MNIST, batch size {args.batch_size}")
    print(f"\nwrote {csv_path} and {png_path}")
    return results


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
    args = parser.parse_args(argv)
    compare(args)
    return 0


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
