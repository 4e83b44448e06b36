"""Mutation testing of every notebook's test cells (`make mutants`): every mutant, a report in Markdown.

Usage: python benchmarks/mutants.py [--notebook 00_from_scratch ...] [--sample K] [--out PATH]

For each notebook of solutions/batch_norm, every mutant of its graded reference solutions
(tests/mutation.py) runs against all of its test cells, hidden tests included, under the grading
budget. The report gives per notebook the mutants generated / killed / equivalent / surviving and
the wall time, each survivor's diff with the battery probe it fails, and each equivalent's diff
with the reason it is one. Exits 1 if any non-equivalent mutant survives.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import mutation  # noqa: E402
from notebook_utils import NOTEBOOKS  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mutants.md"
# why a mutant made by this operator gives the reference's results (when the battery agrees)
REASONS = {
    "no_grad_added": "torch.no_grad() around a statement that builds no graph anything downstream needs",
    "no_grad_removed": "the block's result leaves the function as a number or without requires_grad anyway",
    "detach_added": "the value returned carries no autograd graph already",
    "binop": "the operators agree on these operands (e.g. // and / on an exact quotient)",
    "constant": "the constant is multiplied by zero or is within the question's stated precision",
    "drop_operand": "the dropped operand is neutral here (× 1, + 0) or within the stated precision",
    "statement_deleted": "the statement has no effect on anything returned or checked",
    "force_branch": "both branches give the same result on every input the specification allows",
    "keyword_dropped": "the dropped argument equals its default (or, for device=, the CPU it runs on)",
    "keepdim_flipped": "a (D,) statistic broadcasts against (n, D) exactly as the (1, D) one does",
    "input_swapped": "the two inputs agree at that point (mean already has X's dtype and device)",
}


def killed_status(outcome) -> str:
    return "killed" if outcome.status in ("killed", "timeout", "crashed") else outcome.status


def run(notebooks, sample=None, seed=0):
    results = {}
    for name in notebooks:
        mutants = mutation.notebook_mutants(name)
        chosen = mutation.sample(mutants, sample, seed) if sample else mutants
        print(f"{name}: {len(chosen)} of {len(mutants)} mutants ...", flush=True)
        result = mutation.run_in_worker(mutation.SOLUTIONS / f"{name}.ipynb", chosen)
        result["mutants"] = {m.id: m for m in chosen}
        result["generated"] = len(mutants)
        result["ungraded"] = mutation.ungraded_solution_cells(name)
        counts = Counter(killed_status(o) for o in result["outcomes"])
        result["counts"] = counts
        print(f"  killed {counts['killed']}, equivalent {counts['equivalent']}, surviving {counts['survived']}"
              f" ({result['wall_seconds']:.1f} s)", flush=True)
        results[name] = result
    return results


def report(results, wall: float, sample=None) -> str:
    lines = ["# Mutation testing of the test cells", "",
             "Written by `make mutants` (`python benchmarks/mutants.py`). Each mutant is a one-site change of a "
             "graded reference solution (operators swapped, constants changed, reduction axes, keepdim, "
             "biased/unbiased variance, detach/no_grad, dropped arguments, forced branches, swapped or input "
             "return values, view/reshape shapes, deleted statements), run against every test cell of its "
             "notebook (hidden tests included) under the grading budget. *Killed*: some test cell fails (raises "
             "or writes to stderr), or the mutant times out or crashes. *Equivalent*: every test cell passes and "
             "the notebook's battery (tests/mutation_batteries.py) finds no input on which it differs from the "
             "reference. *Surviving*: every test cell passes although the battery tells it apart — a gap.", ""]
    if sample:
        lines += [f"A sample of {sample} mutants per notebook (not every mutant).", ""]
    lines += ["| notebook | generated | run | killed | equivalent | surviving | wall (s) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    total = Counter()
    for name, r in results.items():
        c = r["counts"]
        run_count = len(r["outcomes"])
        lines.append(f"| {name} | {r['generated']} | {run_count} | {c['killed']} | {c['equivalent']} | "
                     f"{c['survived']} | {r['wall_seconds']:.1f} |")
        total.update({"generated": r["generated"], "run": run_count, **c})
    lines += [f"| **all** | {total['generated']} | {total['run']} | {total['killed']} | {total['equivalent']} | "
              f"{total['survived']} | {wall:.1f} |", ""]
    skipped = {n: r["ungraded"] for n, r in results.items() if r["ungraded"]}
    for name, cells in skipped.items():
        lines += [f"Not mutated in {name}: {', '.join(cells)} (no test cell reads it: optional, not graded).", ""]
    for name, r in results.items():
        survivors = [o for o in r["outcomes"] if o.status == "survived"]
        equivalents = [o for o in r["outcomes"] if o.status == "equivalent"]
        if not survivors and not equivalents:
            continue
        lines += [f"## {name}", ""]
        for title, group in (("Surviving", survivors), ("Equivalent", equivalents)):
            if not group:
                continue
            lines += [f"### {title} ({len(group)})", ""]
            for o in group:
                m = r["mutants"][o.id]
                why = ("; ".join(o.battery[:3]) if o.status == "survived"
                       else REASONS.get(m.operator, "every battery probe agrees"))
                lines += [f"`{o.id}` (line {m.line}) — {why}", "", "```diff", m.diff, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", action="append", choices=NOTEBOOKS, help="only these notebooks")
    parser.add_argument("--sample", type=int, help="a fixed random sample of K mutants per notebook")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--grade", type=int, default=0, metavar="K",
                        help="also grade K killed mutants per notebook through `d2lite grade` (needs the sandbox: "
                             "root, bubblewrap); each must lose points")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    start = time.perf_counter()
    results = run(args.notebook or NOTEBOOKS, args.sample)
    wall = time.perf_counter() - start
    text = report(results, wall, args.sample)
    kept = []
    if args.grade:
        import random
        import tempfile

        picks = []
        for name, r in results.items():
            killed = [r["mutants"][o.id] for o in r["outcomes"] if killed_status(o) == "killed"]
            picks += [(name, m) for m in random.Random(0).sample(killed, min(args.grade, len(killed)))]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            graded = mutation.grade_mutants(Path(tmp), picks)
        kept = [(n, m, s, most) for n, m, s, most in graded if s >= most]
        text += (f"\n## Through `d2lite grade`\n\n{len(graded)} killed mutants ({args.grade} per notebook, seeded) "
                 f"submitted as students and graded by `d2lite grade` in {time.perf_counter() - start:.0f} s: "
                 f"{len(graded) - len(kept)} lost points, {len(kept)} kept every point.\n")
        text += "".join(f"\n- `{m.id}` ({n}): {s:g}/{most:g}\n" for n, m, s, most in kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    surviving = sum(r["counts"]["survived"] for r in results.values())
    print(f"{args.out}: {surviving} surviving non-equivalent mutants, {len(kept)} killed mutants that kept every "
          f"point under d2lite grade, {wall:.0f} s in all")
    return 1 if surviving or kept else 0


if __name__ == "__main__":
    sys.exit(main())
