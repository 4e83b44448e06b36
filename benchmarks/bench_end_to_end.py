"""End to end: the chapter's experiment (load Fashion-MNIST, train LeNet-BN 10 epochs, evaluate
after every epoch), d2l's own pipeline against d2lite's, side by side in one run.

    .venv/bin/python benchmarks/bench_end_to_end.py              # 10 epochs of 60,000 examples
    .venv/bin/python benchmarks/bench_end_to_end.py --rounds 2   # twice, the second in reverse
    .venv/bin/python benchmarks/bench_end_to_end.py --epochs 1 --subset 6000   # a quick look

Pipelines (all with batch 256, SGD lr 1.0, Xavier init, evaluation on the 10,000 test images
with batch 256 after every epoch, ``torch.set_flush_denormal(True)``):

- ``d2l``: d2l's code as the book runs it (benchmarks/d2l_reference.py): torchvision's
  FashionMNIST with per-example ``ToTensor``, ``DataLoader(num_workers=4, shuffle=True)``, the
  from-scratch ``batch_norm`` in plain autograd, ``train_ch6``, ``evaluate_accuracy_gpu``.
- ``d2l-concise``: d2l's pipeline with ``nn.BatchNorm2d/1d`` (the book's "concise" version).
- ``d2lite``: ``d2lite.load_fashion_mnist`` + ``d2lite.train`` with ``lenet(norm="d2lite")``.
- ``d2lite-torch``: the same with ``lenet(norm="torch")`` (``nn.BatchNorm2d/1d``).

Threads: torch's default (2 here) in every pipeline, the experiment as a reader runs it;
``--threads 1`` when the machine is shared. On a 2-core machine where another process keeps a
core busy, each of the ~100 parallel regions of a LeNet step waits for the thread that shares
that core: a step measured 17x slower with 2 threads than with 1. One thread then measures the
pipelines' work rather than the neighbours' (d2l's four DataLoader workers are processes of
their own and still run beside its training thread).

Each pipeline runs in its own fresh Python process, one after the other, so that none inherits
another's caches and each one's peak memory is its own. With ``--rounds N`` the sequence runs N
times, every other round in reverse order, and the table gives each pipeline's median round.
Wall time runs from before the data is loaded to after the last evaluation (interpreter start
and imports excluded, for all alike).
Peak memory is the pipeline process's peak resident set size (``resource.getrusage(
RUSAGE_SELF).ru_maxrss``) and, in brackets, its growth over the resident size after the imports
(torch alone is about 0.7 GB here); d2l's four DataLoader worker processes (forked, mostly
sharing the parent's pages) come on top of it and are not counted.

Results go to benchmarks/results/end_to_end.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PIPELINES = ("d2l", "d2lite", "d2lite-torch", "d2l-concise")
DEFAULT = ("d2l", "d2l-concise", "d2lite", "d2lite-torch")
TRAIN_EXAMPLES = 60_000


def run_one(name: str, args) -> dict:
    """Run one pipeline in this process and return what it measured."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # all pipelines alike: sigmoid at lr 1.0 makes denormals on CPU
    torch.manual_seed(args.seed)
    import d2l_reference  # noqa: F401  (every pipeline imports the same modules before timing)
    import d2lite.data  # noqa: F401
    import torchvision  # noqa: F401
    baseline_rss = _current_rss_mb()
    start = time.perf_counter()
    if name in ("d2l", "d2l-concise"):
        import d2l_reference as d2l

        root = d2lite.data._locate(d2lite.data.data_root())  # the extracted IDX files
        train_iter, test_iter = d2l.load_data_fashion_mnist(args.batch_size, root=str(root),
                                                            subset=args.subset, seed=args.seed)
        net = d2l.lenet_bn_scratch() if name == "d2l" else d2l.lenet_bn_concise()
        out = d2l.train_ch6(net, train_iter, test_iter, args.epochs, args.lr, d2l.try_gpu())
        test_accs, step_rate = out["test_accs"], out["examples_per_sec"]
        train_seconds = out["train_seconds"]
    else:
        import d2lite

        device = d2lite.try_gpu()
        train_iter, test_iter = d2lite.load_fashion_mnist(args.batch_size, subset=args.subset,
                                                          seed=args.seed, device=device)
        net = d2lite.lenet(norm="d2lite" if name == "d2lite" else "torch")
        history = d2lite.train(net, train_iter, test_iter, args.epochs, args.lr, device=device,
                               animate=False, progress=False, verbose=False)
        test_accs, step_rate = history.test_acc, history.examples_per_sec
        train_seconds = sum(history.train_seconds)
    wall = time.perf_counter() - start
    examples = args.epochs * (args.subset or TRAIN_EXAMPLES)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return dict(pipeline=name, wall_s=wall, examples=examples, examples_per_s=examples / wall,
                train_step_examples_per_s=step_rate, train_step_s=train_seconds,
                test_acc=test_accs[-1], test_accs=test_accs,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                baseline_rss_mb=baseline_rss, cuda_peak_mb=peak, threads=torch.get_num_threads(),
                device=device)


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def machine() -> dict:
    import torch
    import torchvision

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, torchvision=torchvision.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def table(rows: list[dict], ref: dict | None) -> str:
    head = ("| pipeline | wall time | examples/s end to end | examples/s training step | "
            "test acc (final) | peak RSS | wall-time speed-up vs d2l | "
            "training-step speed-up vs d2l |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        speed = step = "—"
        if ref is not None:
            speed = f"**{ref['wall_s'] / r['wall_s']:.2f}×**" if r is not ref else "1.00×"
            step = f"{r['train_step_examples_per_s'] / ref['train_step_examples_per_s']:.2f}×"
        rss = f"{r['peak_rss_mb']:.0f} MB (+{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f})"
        if r["pipeline"] in ("d2l", "d2l-concise"):
            rss += " + 4 workers"
        lines.append(f"| {r['pipeline']} | {r['wall_s']:.1f} s | {r['examples_per_s']:,.0f} | "
                     f"{r['train_step_examples_per_s']:,.0f} | {r['test_acc']:.3f} | {rss} | "
                     f"{speed} | {step} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=None,
                        help="train on this many examples (a class-balanced random subset)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads in every pipeline (default 0: torch's default)")
    parser.add_argument("--pipelines", default=",".join(DEFAULT),
                        help=f"comma-separated, from {','.join(PIPELINES)}; the first is the "
                             "reference")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sequence this many times, alternating its order")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_one:  # child process: run one pipeline, print its result as JSON
        print("RESULT " + json.dumps(run_one(args.run_one, args)), flush=True)
        return

    names = args.pipelines.split(",")
    unknown = set(names) - set(PIPELINES)
    if unknown:
        parser.error(f"unknown pipelines {sorted(unknown)}; choose from {PIPELINES}")
    import d2lite.data

    d2lite.data._locate(d2lite.data.data_root())  # extract the archives once, before any timing
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, torchvision "
          f"{info['torchvision']}, Python {info['python']}, threads "
          f"{args.threads or info['threads']}; {args.epochs} epochs of "
          f"{args.subset or TRAIN_EXAMPLES:,} examples", flush=True)
    runs = {name: [] for name in names}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, "--run-one", name, "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--threads", str(args.threads)]
            if args.subset:
                cmd += ["--subset", str(args.subset)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr}")
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
            runs[name].append(result)
            load.append(os.getloadavg()[0])
            print(f"  {name}: {result['wall_s']:.1f} s, test acc {result['test_acc']:.3f}",
                  flush=True)
    # each pipeline's median round (by wall time)
    rows = [sorted(runs[name], key=lambda r: r["wall_s"])[(len(runs[name]) - 1) // 2]
            for name in names]
    ref = rows[0] if rows[0]["pipeline"] in ("d2l", "d2l-concise") else None
    md = table(rows, ref)
    print(md)
    notes = (f"{info['cpu']} ({info['cores']} cores), {rows[0]['device']}, torch {info['torch']}, "
             f"torchvision {info['torchvision']}, Python {info['python']}, "
             f"{rows[0]['threads']} torch threads, {info['date']}; {args.epochs} epochs of "
             f"{args.subset or TRAIN_EXAMPLES:,} examples; "
             f"{args.rounds} round{'s' if args.rounds > 1 else ''} (median round shown); "
             f"1-minute load average {' → '.join(f'{x:.1f}' for x in load)} "
             "(before, and after each pipeline).")
    print(notes)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "end_to_end" + ("" if not args.subset and args.epochs == 10 else "_quick")
    stem += f"_threads{args.threads}" if args.threads else ""
    (args.out / f"{stem}.json").write_text(json.dumps(
        dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, load_average=load,
             results=rows, all_rounds=runs), indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md + "\n\n" + notes + "\n")


if __name__ == "__main__":
    main()
