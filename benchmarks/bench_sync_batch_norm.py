"""Micro-benchmark: what synchronizing batch norm over 2 CPU processes costs, against local batch
norm on the same shards, and how much of it is communication.

    .venv/bin/python benchmarks/bench_sync_batch_norm.py                  # 2 ranks, 1 thread each
    .venv/bin/python benchmarks/bench_sync_batch_norm.py --repeats 20 --warmup 2 --out /tmp/x

``d2lite.distributed.launch`` starts the ranks (forked processes in one gloo group on 127.0.0.1).
Every rank holds its own shard of the given per-rank shape, float32, and times, for each shape:

- ``local``: ``d2lite.batch_norm`` forward + backward in training mode on its shard: what each
  process of data-parallel training does without synchronization (no communication at all);
- ``sync``: ``d2lite.sync_batch_norm`` forward + backward on the same shard: the statistics of the
  whole batch (one ``all_gather`` of count/mean/M2 in the forward, one ``all_reduce`` of two sums
  in the backward);
- ``comm``: those two collectives alone, the same sizes and dtypes as inside ``sync``: an
  ``all_gather`` of a (2C + 1) float64 tensor and an ``all_reduce`` of a 2C tensor in X's dtype.

X, gamma and beta require grad, the running statistics are updated, and the backward takes a fixed
random dY; gradients are reset to None before each call. Every timed call starts right after a
``dist.barrier()``, so both ranks enter it together; a collective's time therefore includes waiting
for the other rank, as it does in training. Each round times the three once, in an order rotated
from round to round (a change of load hits them alike); after ``--warmup`` rounds, ``--repeats``
rounds are timed, and the table gives, per shape, the slower rank's median (a step waits for its
slowest rank). ``other`` = sync - local - comm: sync's extra arithmetic (the moments in float64, the
merge of the gathered moments, reading the global count back).

One thread per rank by default (``--threads``): 2 ranks on a 2-core machine then use one core each.
Each rank first calls ``d2lite.train.keep_freed_memory()``, as ``d2lite.train`` (and so
``train_distributed``) does on the CPU: without it glibc returns every freed temporary over 128 KiB
to the kernel and each call pays page faults to get it back, which costs sync (whose moments make
float64 temporaries, 3.5 MB each at (128, 6, 24, 24)) several ms a call more than local.
Results go to benchmarks/results/sync_batch_norm.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import d2lite  # noqa: E402
from d2lite.distributed import launch  # noqa: E402
from d2lite.train import keep_freed_memory  # noqa: E402

# per-rank shapes: the chapter's LeNet-BN at batch 256 split over 2 processes, and a small batch
SHAPES = [(128, 6, 24, 24), (128, 16, 8, 8), (128, 120), (4, 6, 24, 24)]
NAMES = ("local", "sync", "comm")


def make_calls(shape, rank: int):
    """One callable per measurement, on this rank's data (each rank draws its own)."""
    g = torch.Generator().manual_seed(1000 + rank)
    C = shape[1]
    X = torch.randn(shape, generator=g).requires_grad_()
    dY = torch.randn(shape, generator=g)
    gamma = torch.ones(C, requires_grad=True)
    beta = torch.zeros(C, requires_grad=True)
    state = dict(mean=torch.zeros(C), var=torch.ones(C))
    world = dist.get_world_size()

    def reset():
        X.grad = gamma.grad = beta.grad = None

    def local():
        Y, state["mean"], state["var"] = d2lite.batch_norm(X, gamma, beta, state["mean"],
                                                           state["var"], eps=1e-5, momentum=0.1)
        Y.backward(dY)

    def sync():
        Y, state["mean"], state["var"] = d2lite.sync_batch_norm(X, gamma, beta, state["mean"],
                                                                state["var"], eps=1e-5, momentum=0.1)
        Y.backward(dY)

    def comm():  # the collectives of sync_batch_norm, as it calls them
        moments = torch.zeros(2 * C + 1, dtype=torch.float64)
        gathered = [torch.empty_like(moments) for _ in range(world)]
        dist.all_gather(gathered, moments)
        sums = torch.zeros(2 * C, dtype=X.dtype)
        dist.all_reduce(sums)

    return dict(zip(NAMES, (local, sync, comm))), reset


def timed(fn, reset) -> float:
    reset()
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_rank(rank: int, world: int, shapes, warmup: int, repeats: int, threads: int) -> dict:
    """The body of each rank: medians (seconds) per shape and measurement."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    kept = keep_freed_memory()
    rows = []
    for shape in shapes:
        calls, reset = make_calls(shape, rank)
        times = {name: [] for name in NAMES}
        for r in range(warmup + repeats):
            k = r % len(NAMES)
            for name in NAMES[k:] + NAMES[:k]:
                t = timed(calls[name], reset)
                if r >= warmup:
                    times[name].append(t)
        rows.append(dict(shape=list(shape), median_s={n: statistics.median(t) for n, t in times.items()},
                         quartiles_s={n: statistics.quantiles(t, n=4) if len(t) > 1 else t * 3
                                      for n, t in times.items()},
                         threads=torch.get_num_threads()))
    return dict(rank=rank, rows=rows, keep_freed_memory=kept)


def summarize(per_rank: list[dict], shapes) -> list[dict]:
    """Per shape: every rank's medians in ms, and the slower rank's, with the ratios."""
    rows = []
    for i, shape in enumerate(shapes):
        ranks = [{n: r["rows"][i]["median_s"][n] * 1e3 for n in NAMES} for r in per_rank]
        quartiles = [{n: [q * 1e3 for q in r["rows"][i]["quartiles_s"][n]] for n in NAMES}
                     for r in per_rank]
        ms = {n: max(rank[n] for rank in ranks) for n in NAMES}
        rows.append(dict(shape=list(shape), global_shape=[shape[0] * len(per_rank), *shape[1:]],
                         ms=ms, ms_per_rank=ranks, quartiles_ms_per_rank=quartiles,
                         sync_over_local=ms["sync"] / ms["local"],
                         comm_share_of_sync=ms["comm"] / ms["sync"],
                         other_ms=ms["sync"] - ms["local"] - ms["comm"]))
    return rows


def table(rows: list[dict], processes: int) -> str:
    lines = [f"| shape per rank (float32) | local | sync | sync / local | comm | comm / sync | other |",
             "|" + "---|" * 7]
    for r in rows:
        ms = r["ms"]
        shape = "(" + ", ".join(map(str, r["shape"])) + ")"
        lines.append(f"| {shape} | {ms['local']:.3f} ms | {ms['sync']:.3f} ms | "
                     f"**{r['sync_over_local']:.2f}** | {ms['comm']:.3f} ms | "
                     f"{100 * r['comm_share_of_sync']:.0f} % | {r['other_ms']:.3f} ms |")
    lines.append(f"\n{processes} ranks; times are the slower rank's median. local: "
                 "`d2lite.batch_norm` on the shard (no communication); sync: "
                 "`d2lite.sync_batch_norm` on the same shard; comm: its all_gather + all_reduce "
                 "alone; other = sync - local - comm.")
    spread = ", ".join("({}) {:.2f}-{:.2f} ms".format(
        ", ".join(map(str, r["shape"])), min(q["comm"][0] for q in r["quartiles_ms_per_rank"]),
        max(q["comm"][2] for q in r["quartiles_ms_per_rank"])) for r in rows)
    lines.append(f"\nComm's interquartile range (over ranks): {spread}. A wide range means the "
                 "collectives often wait for a rank's process to be woken or scheduled; other is a "
                 "difference of medians and carries that noise.")
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, nproc=len(os.sched_getaffinity(0)), cores=os.cpu_count(),
                threads_per_rank=threads, torch=torch.__version__,
                python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M"),
                load_average_before=os.getloadavg()[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--repeats", type=int, default=300,
                        help="timed rounds per shape (default 300); the median is reported")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for sync_batch_norm.md (and the JSON, unless --json)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the JSON (default OUT/sync_batch_norm.json)")
    args = parser.parse_args(argv)
    for option in ("processes", "repeats", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    if args.processes < 2:
        parser.error("--processes must be at least 2: with one rank sync_batch_norm communicates nothing")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    info = machine_info(args.threads)
    command = ".venv/bin/python benchmarks/bench_sync_batch_norm.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"{info['cpu']}, nproc {info['nproc']}, {args.processes} ranks x {args.threads} "
          f"thread(s), torch {info['torch']}", flush=True)
    per_rank = launch(bench_rank, args.processes,
                      (SHAPES, args.warmup, args.repeats, args.threads),
                      timeout=3600.0, threads=args.threads)
    info["load_average_after"] = os.getloadavg()[0]
    info["keep_freed_memory"] = all(r["keep_freed_memory"] for r in per_rank)
    rows = summarize(per_rank, SHAPES)
    # the load after includes the ranks' own (up to one per rank): only the load before tells
    loaded = info["load_average_before"] >= 0.5 * info["nproc"]
    note = (f"\n\nThe machine had other load: 1-minute load average {info['load_average_before']:.1f}"
            f" before the run, on {info['nproc']} cores; the ranks shared cores with other jobs, "
            "and a collective waits for a descheduled rank." if loaded else "")
    text = (f"`{command}`\n\nCPU: {info['cpu']}, nproc {info['nproc']}; {args.processes} ranks "
            f"(gloo, 127.0.0.1), {args.threads} torch thread(s) each; torch {info['torch']}; "
            f"{args.warmup} warm-up + {args.repeats} timed rounds, medians; freed memory kept "
            f"(`keep_freed_memory`): {'yes' if info['keep_freed_memory'] else 'no'}; {info['date']}, "
            f"1-minute load average {info['load_average_before']:.1f} → "
            f"{info['load_average_after']:.1f}\n\n{table(rows, args.processes)}{note}")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "sync_batch_norm.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(dict(command=command, machine=info, processes=args.processes,
                                         warmup=args.warmup, repeats=args.repeats, results=rows),
                                    indent=2) + "\n")
    (args.out / "sync_batch_norm.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
