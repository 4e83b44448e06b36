"""Micro-benchmark: batch norm forward + backward in training mode, float32, three implementations
side by side, on the CPU (and on CUDA when there is a GPU).

    .venv/bin/python benchmarks/bench_batch_norm.py                  # one thread
    .venv/bin/python benchmarks/bench_batch_norm.py --threads 0      # torch's default (2 here)
    .venv/bin/python benchmarks/bench_batch_norm.py --profile        # torch.profiler tables

One thread by default: it measures the kernels' work. With two threads on a 2-core machine
that others use too, every parallel region waits for a busy core, and the table measures the
neighbours (``--threads 0`` for torch's default; bench_end_to_end.py says more).

- ``d2l``: d2l's from-scratch ``batch_norm`` in plain autograd (benchmarks/d2l_reference.py), with
  gamma, beta and the moving statistics shaped (1, C, 1, 1) or (1, C) as its ``BatchNorm`` keeps
  them.
- ``ATen``: ``torch.nn.functional.batch_norm(training=True)``, PyTorch's fused C++ kernels.
- ``d2lite``: ``d2lite.batch_norm``, an autograd.Function with the analytic backward.

Every call updates running statistics, X, gamma and beta require grad, and the backward takes
a fixed random dY; gradients are reset to None before each call. Each round times every
implementation once, in an order rotated from round to round, so that a change of load on the
machine hits all of them alike; the tables give medians over the rounds, and ratios of medians.

Effective bandwidth counts the bytes that any implementation must move at least once: the
forward reads X and writes Y, the backward reads X and dY and writes dX, so 5 x 4 bytes per
element; GB/s = that / median time. Copy bandwidth for reference: ``dst.copy_(src)`` of a
256 MiB float32 tensor, counting its read and its write.

Results go to benchmarks/results/batch_norm.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import d2l_reference  # noqa: E402

import d2lite  # noqa: E402

SHAPES = [(256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (128, 64, 56, 56)]
NAMES = ("d2l", "ATen", "d2lite")


def make_calls(shape, device):
    """One fwd+bwd callable per implementation, on the same data."""
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    X = torch.randn(shape, generator=g).to(device).requires_grad_()
    dY = torch.randn(shape, generator=g).to(device)
    gamma = torch.ones(C, device=device, requires_grad=True)
    beta = torch.zeros(C, device=device, requires_grad=True)
    state = dict(mean=torch.zeros(C, device=device), var=torch.ones(C, device=device))
    view = (1, C) + (1,) * (len(shape) - 2)
    gamma_d2l = torch.ones(view, device=device, requires_grad=True)
    beta_d2l = torch.zeros(view, device=device, requires_grad=True)
    d2l_state = dict(mean=torch.zeros(view, device=device), var=torch.ones(view, device=device))

    def reset():
        X.grad = gamma.grad = beta.grad = gamma_d2l.grad = beta_d2l.grad = None

    def d2l():
        Y, d2l_state["mean"], d2l_state["var"] = d2l_reference.batch_norm(
            X, gamma_d2l, beta_d2l, d2l_state["mean"], d2l_state["var"], eps=1e-5, momentum=0.9)
        Y.backward(dY)

    def aten():
        F.batch_norm(X, state["mean"], state["var"], gamma, beta, training=True,
                     momentum=0.1, eps=1e-5).backward(dY)

    def ours():
        Y, state["mean"], state["var"] = d2lite.batch_norm(X, gamma, beta, state["mean"],
                                                           state["var"], eps=1e-5, momentum=0.1)
        Y.backward(dY)

    return dict(zip(NAMES, (d2l, aten, ours))), reset


def timed(fn, reset, device) -> float:
    reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_shape(shape, device, seconds, min_rounds, max_rounds):
    calls, reset = make_calls(shape, device)
    for fn in calls.values():  # warm-up: allocator, lazy initialization, caches
        for _ in range(2):
            timed(fn, reset, device)
    estimate = sum(timed(fn, reset, device) for fn in calls.values())
    rounds = int(min(max_rounds, max(min_rounds, seconds / max(estimate, 1e-9))))
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(calls[name], reset, device))
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def copy_bandwidth(device, reps: int = 15) -> float:
    """GB/s of dst.copy_(src) for 256 MiB of float32, read + write counted."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def run_device(device, args) -> dict:
    copy = copy_bandwidth(device)
    rows = []
    for shape in args.shapes:
        med, rounds = bench_shape(shape, device, args.seconds, args.min_rounds, args.max_rounds)
        numel = 1
        for s in shape:
            numel *= s
        gbytes = 5 * numel * 4 / 1e9
        rows.append(dict(shape=list(shape), rounds=rounds, ms={k: v * 1e3 for k, v in med.items()},
                         gb_per_s={k: gbytes / v for k, v in med.items()}))
        print(f"  {shape}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
              + f" ({rounds} rounds)", flush=True)
    return dict(device=str(device), copy_gb_per_s=copy, rows=rows)


def table(result: dict) -> str:
    lines = ["| shape (float32) | d2l-style | ATen | d2lite | d2lite / ATen | d2l / ATen | "
             "d2lite GB/s | ATen GB/s |", "|" + "---|" * 8]
    for r in result["rows"]:
        ms, gb = r["ms"], r["gb_per_s"]
        shape = "(" + ", ".join(map(str, r["shape"])) + ")"
        lines.append(f"| {shape} | {ms['d2l']:.3f} ms | {ms['ATen']:.3f} ms | "
                     f"{ms['d2lite']:.3f} ms | "
                     f"**{ms['d2lite'] / ms['ATen']:.2f}** | {ms['d2l'] / ms['ATen']:.2f} | "
                     f"{gb['d2lite']:.1f} | {gb['ATen']:.1f} |")
    lines.append(f"\nCopy bandwidth (`dst.copy_(src)`, 256 MiB, read + write): "
                 f"{result['copy_gb_per_s']:.1f} GB/s. Ratios below 1: d2lite is faster than ATen.")
    return "\n".join(lines)


def profile(args) -> None:
    """Where the time goes: torch.profiler's table (self CPU time per operator) for 20 calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lines = []
    for shape in args.shapes:
        calls, reset = make_calls(shape, torch.device("cpu"))
        for name in ("ATen", "d2lite"):
            reps = 3 if shape[0] * shape[1] > 10**4 and len(shape) == 4 and shape[2] > 30 else 20
            for _ in range(2):
                timed(calls[name], reset, torch.device("cpu"))
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    timed(calls[name], reset, torch.device("cpu"))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            lines.append(f"### {name}, {shape}, {reps} calls, {torch.get_num_threads()} threads"
                         f"\n\n```\n{table}\n```")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.threads == 1 else f"_threads{args.threads or 'default'}"
    (args.out / f"batch_norm_profile{suffix}.md").write_text("\n\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1; 0: torch's default)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="time budget per shape and device (rounds are adapted to it)")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=400)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler tables of ATen and d2lite per shape (CPU)")
    args = parser.parse_args(argv)
    args.shapes = SHAPES
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.profile:
        profile(args)
        return
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=sys.version.split()[0],
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                date=time.strftime("%Y-%m-%d %H:%M"), load_average_before=os.getloadavg()[0])
    print(f"{cpu}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}",
          flush=True)
    results = []
    for device in devices:
        print(f"{device}:", flush=True)
        results.append(run_device(device, args))
    info["load_average_after"] = os.getloadavg()[0]
    md = []
    for result in results:
        where = (f"CPU: {cpu}, {info['cores']} cores, {info['threads']} torch threads"
                 if result["device"] == "cpu" else f"CUDA: {info['gpu']}")
        md.append(f"{where}; torch {info['torch']}; medians of interleaved rounds; "
                  f"{info['date']}, 1-minute load average {info['load_average_before']:.1f} → "
                  f"{info['load_average_after']:.1f}\n\n{table(result)}")
    text = "\n\n".join(md)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.threads == 1 else f"_threads{args.threads or 'default'}"
    (args.out / f"batch_norm{suffix}.json").write_text(
        json.dumps(dict(machine=info, results=results), indent=2) + "\n")
    (args.out / f"batch_norm{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
