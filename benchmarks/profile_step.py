"""Where a LeNet-BN training step spends its time, layer by layer: d2l's network against d2lite's.

    .venv/bin/python benchmarks/profile_step.py               # torch's default threads (2 here)
    .venv/bin/python benchmarks/profile_step.py --threads 1

One step = zero_grad, forward, cross-entropy, backward, SGD step, on a batch of 256 real
Fashion-MNIST images (the data is in memory: this is the training step alone). Forward times are
taken around each layer's call; backward times from hooks on each layer's output gradient: the
backward of layer i runs from the moment the gradient of its output is ready until the gradient
of its input is (parameter-gradient accumulation included). No torch.profiler: its per-operator
bookkeeping inflated a 21 ms step to 31 ms here.

- ``d2l``: d2l's LeNet-BN (benchmarks/d2l_reference.py: nn.Conv2d, nn.AvgPool2d, d2l's from-scratch
  batch norm in plain autograd), in a process with glibc's default malloc settings.
- ``d2lite``: ``d2lite.lenet(norm="d2lite")`` after ``d2lite.train.keep_freed_memory()``, as
  ``d2lite.train`` runs it.

Each network is timed in its own fresh process (the malloc setting is per process). The step
counts are medians over rounds of ``--steps`` steps. Results go to
benchmarks/results/step_profile.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def profile_one(name: str, args) -> dict:
    import torch
    from torch import nn

    import d2lite
    from d2lite.train import init_xavier, keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if name == "d2l":
        import d2l_reference
        net = d2l_reference.lenet_bn_scratch()
        names = [f"{i}:{type(m).__name__}" for i, m in enumerate(net)]
    else:
        keep_freed_memory()
        net = d2lite.lenet(norm="d2lite")
        names = [n for n, _ in net.named_children()]
    net.apply(init_xavier)
    layers = list(net.children())
    train_iter, _ = d2lite.load_fashion_mnist(256, subset=2560, seed=0)
    batches = list(train_iter)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    loss_fn = nn.CrossEntropyLoss()
    fwd = [0.0] * len(layers)
    bwd = [0.0] * len(layers)
    other = dict(loss=0.0, backward_rest=0.0, optimizer=0.0)

    def step(X, y, record: bool) -> None:
        opt.zero_grad(set_to_none=True)
        stamps = [None] * (len(layers) + 1)  # stamps[i]: gradient of layer i's output ready
        h = X
        for i, layer in enumerate(layers):
            start = time.perf_counter()
            h = layer(h)
            fwd[i] += (time.perf_counter() - start) if record else 0.0
            if h.requires_grad:
                h.register_hook(lambda g, i=i: stamps.__setitem__(i, time.perf_counter()))
        start = time.perf_counter()
        loss = loss_fn(h, y)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        opt.step()
        done = time.perf_counter()
        if record:
            other["loss"] += mid - start
            other["optimizer"] += done - end
            # layer i's backward: from its output's gradient to its input's (the previous layer's
            # output), the first layer's until backward() returns
            for i in range(len(layers)):
                if stamps[i] is None:
                    continue
                until = end if i == 0 else (stamps[i - 1] or end)
                bwd[i] += until - stamps[i]
            other["backward_rest"] += (stamps[len(layers) - 1] or end) - mid

    for X, y in batches[:3] * 4:  # warm-up
        step(X, y, False)
    rounds = []
    for r in range(args.rounds):
        start = time.perf_counter()
        for k in range(args.steps):
            X, y = batches[k % len(batches)]
            step(X, y, True)
        rounds.append((time.perf_counter() - start) / args.steps)
    n = args.rounds * args.steps
    return dict(name=name, layers=names, forward_ms=[t / n * 1e3 for t in fwd],
                backward_ms=[t / n * 1e3 for t in bwd],
                other_ms={k: v / n * 1e3 for k, v in other.items()},
                step_ms=statistics.median(rounds) * 1e3, threads=torch.get_num_threads())


def markdown(results: list[dict], info: str) -> str:
    lines = [info, ""]
    for r in results:
        total_f, total_b = sum(r["forward_ms"]), sum(r["backward_ms"])
        lines += [f"**{r['name']}**: {r['step_ms']:.2f} ms per step (median of rounds; "
                  f"{256 / r['step_ms'] * 1e3:,.0f} examples/s), {r['threads']} threads", "",
                  "| layer | forward ms | backward ms | share of the layers' time |",
                  "|---|---|---|---|"]
        for name, f, b in zip(r["layers"], r["forward_ms"], r["backward_ms"]):
            lines.append(f"| {name} | {f:.2f} | {b:.2f} | {(f + b) / (total_f + total_b):.0%} |")
        o = r["other_ms"]
        lines += [f"| all layers | {total_f:.2f} | {total_b:.2f} | 100% |",
                  f"| loss, backward to the logits, SGD step | {o['loss']:.2f} | "
                  f"{o['backward_rest']:.2f} | +{o['optimizer']:.2f} ms SGD |", ""]
        convs = [i for i, n in enumerate(r["layers"]) if "conv" in n.lower()]
        conv_ms = sum(r["forward_ms"][i] + r["backward_ms"][i] for i in convs)
        lines += [f"Convolutions (oneDNN's kernels): {conv_ms:.2f} ms, "
                  f"{conv_ms / (total_f + total_b):.0%} of the layers' time.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one network, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(profile_one(args.one, args)))
        return
    results = []
    for name in ("d2l", "d2lite"):
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads),
               "--steps", str(args.steps), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(HERE.parent)}).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    from bench_end_to_end import machine
    m = machine()
    info = (f"CPU: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, 1-minute "
            f"load average {os.getloadavg()[0]:.1f}; batch 256 of real Fashion-MNIST")
    text = markdown(results, info)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.md").write_text(text + "\n")
    (args.out / "step_profile.json").write_text(json.dumps(dict(info=info, results=results),
                                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
