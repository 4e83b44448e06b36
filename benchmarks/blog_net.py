"""The blog's network on real Fashion-MNIST: batch norm on conv2 and fc1 only, against none and everywhere.

    .venv/bin/python benchmarks/blog_net.py                          # 5 epochs, lr 0.1 and 1.0, seeds 0,1
    .venv/bin/python benchmarks/blog_net.py --epochs 1 --subset 6000 --seeds 0   # a quick look

The network is PyTorch's classic MNIST example (``d2lite.mnist_net``: conv 1→10, conv 10→20,
fc 320→50, fc 50→10, max pooling, ReLU, log-softmax), in three forms:

- ``none``: no batch norm;
- ``blog``: batch norm after conv2 and fc1 only (``norm_layers=("conv2", "fc1")``), the blog's;
- ``all``: batch norm after conv1, conv2 and fc1.

Every run: ``d2lite.load_fashion_mnist`` with inputs normalized by Fashion-MNIST's mean and std
(0.2860, 0.3530), as PyTorch's example normalizes MNIST; plain SGD (d2lite.train's, no momentum)
at each ``--lr``; PyTorch's default initialization (``init=None``: the example's, not d2l's
Xavier); the seed sets both the initial weights and the shuffling, so each form sees the same
batches for a given seed. Test accuracy is after the last epoch, on the 10,000 test images.
Seconds per epoch include the evaluation; they are this machine's, which others may share (the
load average is printed), so read them as rough. ``--threads 1`` keeps a busy neighbour from
stalling torch's parallel regions (see bench_end_to_end.py).

Results go to benchmarks/results/blog_net.md, the command at the top.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import d2lite

HERE = Path(__file__).resolve().parent
NETS = {"none": dict(norm=None), "blog": dict(norm_layers=("conv2", "fc1")),
        "all": dict(norm_layers="all")}
LABELS = {"none": "no batch norm", "blog": "conv2 + fc1 (the blog's)",
          "all": "conv1 + conv2 + fc1 (everywhere)"}
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=_floats, default=[0.1, 1.0], help="comma-separated, e.g. 0.1,1.0")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated, e.g. 0,1")
    p.add_argument("--nets", default="none,blog,all", help=f"comma-separated among {list(NETS)}")
    p.add_argument("--norm", default="torch", choices=("torch", "d2lite"),
                   help="nn.BatchNorm2d/1d (the blog's, default) or d2lite.BatchNorm")
    p.add_argument("--subset", type=int, default=None, help="training examples (default: all 60,000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in args.nets if n not in NETS]
    if unknown or not args.nets:
        p.error(f"--nets must name some of {list(NETS)}, got {args.nets}")
    if not args.lr or not args.seeds:
        p.error("--lr and --seeds need at least one value each")
    return args


def run(net_name: str, lr: float, seed: int, args) -> d2lite.History:
    """One training run, from the seed's initial weights and shuffling."""
    train_iter, test_iter = d2lite.load_fashion_mnist(
        args.batch_size, normalize=FASHION_MNIST_MEAN_STD, subset=args.subset, seed=seed)
    torch.manual_seed(seed)
    options = dict(NETS[net_name])
    net = d2lite.mnist_net(**{"norm": args.norm, **options})
    return d2lite.train(net, train_iter, test_iter, args.epochs, lr, device="cpu", init=None,
                        name=f"{net_name} lr={lr} seed={seed}", animate=False, progress=False,
                        verbose=False)


def table(results: dict, args) -> str:
    """Markdown: one row per lr and network, test accuracy over seeds and seconds per epoch."""
    several = len(args.seeds) > 1
    acc_head = "test acc, mean ± sd over seeds" if several else "test acc"
    lines = [f"| lr | batch norm on | {acc_head} | per seed | train loss (mean) | s / epoch |",
             "|---|---|---|---|---|---|"]
    for lr in args.lr:
        for name in args.nets:
            hs = results[lr, name]
            accs = [h.final.test_acc for h in hs]
            acc = f"{statistics.mean(accs):.3f}" + (f" ± {statistics.stdev(accs):.3f}" if several else "")
            losses = [h.final.train_loss for h in hs]
            epoch_s = statistics.mean(h.total_seconds / len(h) for h in hs)
            lines.append(f"| {lr:g} | {LABELS[name]} | {acc} | {', '.join(f'{a:.3f}' for a in accs)} "
                         f"| {statistics.mean(losses):.3f} | {epoch_s:.1f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = f"D2LITE_DATA={shlex.quote(os.environ['D2LITE_DATA'])} " if "D2LITE_DATA" in os.environ else ""
    command = f"{data}.venv/bin/python benchmarks/blog_net.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    results = {}
    for lr in args.lr:
        for name in args.nets:
            results[lr, name] = []
            for seed in args.seeds:
                h = run(name, lr, seed, args)
                results[lr, name].append(h)
                print(f"{h.name}: test acc {h.final.test_acc:.3f}, train loss "
                      f"{h.final.train_loss:.3f}, {h.total_seconds / len(h):.1f} s/epoch", flush=True)
    body = table(results, args)
    examples = f"{args.subset:,}" if args.subset else "60,000"
    md = (f"# The blog's network: batch norm on conv2 and fc1 only\n\n"
          f"Command: `{command}`\n\n"
          f"d2lite.mnist_net (PyTorch's MNIST example net, log-softmax output), norm={args.norm!r}; "
          f"{args.epochs} epoch{'s' * (args.epochs != 1)} of {examples} Fashion-MNIST training examples, batch "
          f"{args.batch_size}, plain SGD, PyTorch's default init, inputs normalized "
          f"{FASHION_MNIST_MEAN_STD}; test accuracy after the last epoch on the 10,000 test images; "
          f"seeds {', '.join(map(str, args.seeds))}.\n"
          f"{_cpu_name()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}; {started}, 1-minute load average "
          f"{load_before:.1f} → {os.getloadavg()[0]:.1f} (s / epoch includes evaluation and is "
          f"rough on a shared machine).\n\n{body}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blog_net.md").write_text(md)
    print(body)
    print(f"written to {args.out / 'blog_net.md'}")


if __name__ == "__main__":
    main()
