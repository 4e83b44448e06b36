"""Mutation testing of the chapter's test cells: mutants of each reference solution, run the fast way.

A notebook is split into its setup cell, solution cells, test cells (visible and hidden), locked
read-only cells and free cells (demos and experiments; only those that define a name a later graded
cell reads are kept). One worker process per notebook runs the setup under the grading budget once,
then forks a child per mutant: the child executes the cells in notebook order with one solution
cell mutated, then records pass/fail per test cell. A surviving mutant is then compared with the
reference on the notebook's battery (mutation_batteries.py): it is *equivalent* only if every probe
agrees.

A test cell fails, as under nbgrader autograde, if it raises or writes anything to stderr (Python's
sys.stderr or file descriptor 2). A mutant that runs past its time limit, or whose child dies, is
counted as killed (nbgrader would record an error or no grade).
"""
from __future__ import annotations

import ast
import builtins
import copy
import difflib
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions" / "batch_norm"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
REDUCTIONS = {"mean", "sum", "var", "std", "amax", "amin", "max", "min", "var_mean", "std_mean", "norm"}
SWAPPED_METHODS = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "sqrt": "rsqrt",
                   "rsqrt": "sqrt", "amax": "amin", "amin": "amax"}
BINOPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div, ast.Add], ast.Div: [ast.Mult, ast.FloorDiv],
          ast.FloorDiv: [ast.Div], ast.Pow: [ast.Mult], ast.MatMult: [ast.Mult], ast.Mod: [ast.FloorDiv]}
CMPOPS = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt],
          ast.GtE: [ast.Gt, ast.LtE], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.In: [ast.NotIn],
          ast.NotIn: [ast.In], ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}


# ---------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    index: int
    kind: str          # setup | solution | test | locked | free
    grade_id: str
    source: str


def read_cells(path: Path) -> list[Cell]:
    """The notebook's code cells, classified."""
    cells = []
    for i, cell in enumerate(nbformat.read(str(path), as_version=4).cells):
        if cell.cell_type != "code":
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {})
        gid = meta.get("grade_id", f"cell{i}")
        kind = ("setup" if gid == "setup" else "test" if meta.get("grade") else "solution"
                if meta.get("solution") else "locked" if meta else "free")
        cells.append(Cell(i, kind, gid, cell.source))
    return cells


def _stored_and_loaded(source: str) -> tuple[set, set]:
    tree = ast.parse(source)
    stored, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else stored).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stored.add(node.name)
        elif isinstance(node, ast.arg):
            stored.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            stored.update((a.asname or a.name).split(".")[0] for a in node.names)
    return stored, loaded


def _top_level(source: str) -> set:
    """The names a cell defines for later cells: its module-level functions, classes, imports and
    assignment targets (not the local variables of its functions)."""
    names = set()
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
            continue
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                break
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def needed_cells(cells: list[Cell]) -> list[Cell]:
    """The cells a mutant runs after setup: every solution, test and locked cell, and the free cells
    that store a name some later graded/solution/locked cell reads and nothing graded stored before."""
    kept, provided = [], set()
    flow = [(c, *_stored_and_loaded(c.source)) for c in cells]
    for i, (cell, _, _) in enumerate(flow):
        stored = _top_level(cell.source)
        if cell.kind == "setup":
            provided |= stored
            continue
        if cell.kind == "free":
            later = set()
            for other, o_stored, o_loaded in flow[i + 1:]:
                if other.kind != "free":
                    later |= o_loaded - o_stored
            if not (stored & later) - provided - set(dir(builtins)):
                continue
        kept.append(cell)
        provided |= stored
    return kept


def regions(source: str) -> list[tuple[int, int]]:
    """1-based (first, last) line numbers strictly between BEGIN/END SOLUTION markers."""
    found, start = [], None
    for n, line in enumerate(source.splitlines(), 1):
        if line.strip() == BEGIN:
            start = n
        elif line.strip() == END and start is not None:
            found.append((start + 1, n - 1))
            start = None
    return found


# ---------------------------------------------------------------------------------------- mutants
@dataclass
class Mutant:
    id: str            # "<grade_id>:<operator>:<site>:<variant>", unique and stable
    cell: str          # the grade_id of the mutated solution cell
    operator: str
    line: int          # line in the cell's source
    source: str        # the whole mutated cell, as ast.unparse writes it
    diff: str = ""


def _const(value):
    return ast.Constant(value=value)


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return None


def _with_no_grad(stmts):
    call = ast.Call(func=ast.Attribute(value=ast.Name("torch", ast.Load()), attr="no_grad", ctx=ast.Load()),
                    args=[], keywords=[])
    return [ast.With(items=[ast.withitem(context_expr=call)], body=stmts)]


def _is_no_grad(node) -> bool:
    return isinstance(node, ast.With) and any(_call_name(i.context_expr) == "no_grad" for i in node.items)


def alternatives(node: ast.AST, params: list[str]):
    """(operator, make) pairs for one node; make(copy_of_node) returns the replacement: a node, or a
    list of statements where the node is a statement."""
    alts = []
    add = alts.append
    if isinstance(node, ast.BinOp):
        for op in BINOPS.get(type(node.op), []):
            add(("binop", lambda n, op=op: ast.BinOp(n.left, op(), n.right)))
        add(("drop_operand", lambda n: n.left))
        add(("drop_operand", lambda n: n.right))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1:
        for op in CMPOPS.get(type(node.ops[0]), []):
            add(("compare", lambda n, op=op: ast.Compare(n.left, [op()], n.comparators)))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        add(("boolop", lambda n, other=other: ast.BoolOp(other(), n.values)))
        for k in range(len(node.values)):
            add(("drop_condition", lambda n, k=k: n.values[k]))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        add(("drop_unary", lambda n: n.operand))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        for new in dict.fromkeys([1 if v == 0 else 0 if v == 1 else None, v + 1, v - 1, v * 2]):
            if new is not None and new != v:
                add(("constant", lambda n, new=type(v)(new): _const(new)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        add(("constant", lambda n: _const(not n.value)))
    elif isinstance(node, (ast.If, ast.IfExp)):
        for forced in (True, False):
            add(("force_branch", lambda n, forced=forced: _forced(n, forced)))
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and params and node.id in params:
        for other in params:  # one input confused with another (moving_mean for mean's partner, eps for momentum)
            if other != node.id:
                add(("input_swapped", lambda n, other=other: ast.Name(other, ast.Load())))
    if isinstance(node, ast.Call):
        alts += _call_alternatives(node)
    if _is_no_grad(node):
        add(("no_grad_removed", lambda n: n.body))
    elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) and not _is_docstring(node):
        add(("statement_deleted", lambda n: [ast.Pass()]))
        if isinstance(node, ast.Assign) and params is not None:
            add(("no_grad_added", lambda n: _with_no_grad([n])))
    alts = [a for a in alts if a[1] is not None]
    if isinstance(node, ast.Return) and node.value is not None:
        alts += _return_alternatives(node, params)
    return alts


def _is_docstring(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _forced(node, forced: bool):
    if isinstance(node, ast.IfExp):
        return node.body if forced else node.orelse
    return (node.body if forced else node.orelse) or [ast.Pass()]


def _call_alternatives(node: ast.Call):
    alts = []
    name = _call_name(node)
    for k, kw in enumerate(node.keywords):
        if kw.arg is None:
            continue
        alts.append(("keyword_dropped", lambda n, k=k: _replace_keywords(n, n.keywords[:k] + n.keywords[k + 1:])))
        if kw.arg == "keepdim" and isinstance(kw.value, ast.Constant):
            alts.append(("keepdim_flipped", lambda n, k=k: _set_keyword(n, k, _const(not n.keywords[k].value.value))))
        if kw.arg == "unbiased" and isinstance(kw.value, ast.Constant):
            alts.append(("variance_bias", lambda n, k=k: _set_keyword(n, k, _const(not n.keywords[k].value.value))))
        if kw.arg == "correction" and isinstance(kw.value, ast.Constant):
            alts.append(("variance_bias", lambda n, k=k: _set_keyword(n, k, _const(1 - n.keywords[k].value.value))))
        if kw.arg == "dim":
            for dim in (0, 1, -1):
                alts.append(("reduction_dim", lambda n, k=k, dim=dim: _set_keyword(n, k, _const(dim))))
    if name in ("var", "std") and not any(kw.arg in ("unbiased", "correction") for kw in node.keywords):
        alts.append(("variance_bias", lambda n: _replace_keywords(
            n, n.keywords + [ast.keyword("correction", _const(0))])))
    if name in REDUCTIONS and node.args and isinstance(node.func, ast.Attribute):
        for dim in (0, 1, -1):
            alts.append(("reduction_dim", lambda n, dim=dim: _replace_args(n, [_const(dim)] + n.args[1:])))
        alts.append(("reduction_dim", lambda n: _replace_args(n, n.args[1:])))
    if name in REDUCTIONS and not node.args and not any(kw.arg == "dim" for kw in node.keywords) \
            and isinstance(node.func, ast.Attribute):
        alts.append(("reduction_dim", lambda n: _replace_args(n, [_const(0)])))
    if name in SWAPPED_METHODS and isinstance(node.func, ast.Attribute):
        alts.append(("method_swapped", lambda n: ast.Call(ast.Attribute(n.func.value, SWAPPED_METHODS[name], ast.Load()),
                                                          n.args, n.keywords)))
    if name == "detach" and isinstance(node.func, ast.Attribute) and not node.args:
        alts.append(("detach_removed", lambda n: n.func.value))
    if name in ("view", "reshape") and node.args:
        alts.append(("shape_changed", lambda n: _replace_args(n, [_const(-1)])))
        if len(node.args) > 1:
            alts.append(("shape_changed", lambda n: _replace_args(n, n.args[1:] + n.args[:1])))
    if name not in REDUCTIONS | {"view", "reshape"} and len(node.args) >= 2:
        alts.append(("argument_dropped", lambda n: _replace_args(n, n.args[:-1])))
    return alts


def _replace_keywords(n, keywords):
    return ast.Call(n.func, n.args, keywords)


def _replace_args(n, args):
    return ast.Call(n.func, args, n.keywords)


def _set_keyword(n, k, value):
    keywords = list(n.keywords)
    keywords[k] = ast.keyword(keywords[k].arg, value)
    return ast.Call(n.func, n.args, keywords)


def _return_alternatives(node: ast.Return, params: list[str]):
    alts = []
    value = node.value
    items = value.elts if isinstance(value, ast.Tuple) else [value]
    for k in range(len(items)):
        for p in params or []:
            if not (isinstance(items[k], ast.Name) and items[k].id == p):
                alts.append(("return_input", lambda n, k=k, p=p: _return_item(n, k, ast.Name(p, ast.Load()))))
        if isinstance(items[k], ast.Name):
            alts.append(("detach_added", lambda n, k=k: _return_item(n, k, ast.Call(
                ast.Attribute(_items(n)[k], "detach", ast.Load()), [], []))))
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            alts.append(("return_swapped", lambda n, a=a, b=b: _return_swap(n, a, b)))
    return alts


def _items(n):
    return n.value.elts if isinstance(n.value, ast.Tuple) else [n.value]


def _return_item(n, k, new):
    items = list(_items(n))
    items[k] = new
    return ast.Return(ast.Tuple(items, ast.Load()) if isinstance(n.value, ast.Tuple) else items[0])


def _return_swap(n, a, b):
    items = list(_items(n))
    items[a], items[b] = items[b], items[a]
    return ast.Return(ast.Tuple(items, ast.Load()))


def _in_regions(node, spans) -> bool:
    first, last = getattr(node, "lineno", None), getattr(node, "end_lineno", None)
    return first is not None and any(a <= first and last <= b for a, b in spans)


def _params(tree) -> dict[int, list[str]]:
    """id(node) -> the parameter names of the innermost function around it (self excluded)."""
    out = {}

    def visit(node, params):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg != "self"]
        out[id(node)] = params
        for child in ast.iter_child_nodes(node):
            visit(child, params)
    visit(tree, None)
    return out


def _replace(tree, target, new) -> None:
    for parent in ast.walk(tree):
        for fname, value in ast.iter_fields(parent):
            if value is target:
                if isinstance(new, list):  # a statement replaced by statements in a non-list field
                    raise ValueError("cannot splice statements here")
                setattr(parent, fname, new)
                return
            if isinstance(value, list) and any(v is target for v in value):
                k = next(i for i, v in enumerate(value) if v is target)
                value[k:k + 1] = new if isinstance(new, list) else [new]
                return
    raise ValueError("node not found")


def mutants_of(cell: Cell) -> list[Mutant]:
    """Every mutant of the solution regions of one cell, deterministic, without duplicates."""
    spans = regions(cell.source)
    tree = ast.parse(cell.source)
    reference = ast.unparse(tree)
    params = _params(tree)
    seen, out = {reference}, []
    # an error message's wording is not behaviour: nothing inside an f-string is mutated
    in_messages = {id(n) for s in ast.walk(tree) if isinstance(s, ast.JoinedStr) for n in ast.walk(s)}
    for index, node in enumerate(ast.walk(tree)):
        if not _in_regions(node, spans) or id(node) in in_messages:
            continue
        for variant, (operator, make) in enumerate(alternatives(node, params.get(id(node)))):
            mutated = copy.deepcopy(tree)
            target = list(ast.walk(mutated))[index]
            try:
                _replace(mutated, target, make(target))
                source = ast.unparse(ast.fix_missing_locations(mutated))
                compile(source, cell.grade_id, "exec")
            except (ValueError, SyntaxError, TypeError, AttributeError):
                continue
            if source in seen:
                continue
            seen.add(source)
            diff = "\n".join(difflib.unified_diff(reference.splitlines(), source.splitlines(), "reference",
                                                  "mutant", n=1, lineterm=""))
            out.append(Mutant(f"{cell.grade_id}:{operator}:{index}:{variant}", cell.grade_id, operator,
                              node.lineno, source, diff))
    return out


def graded_solution_cells(cells: list[Cell]) -> list[Cell]:
    """The solution cells some test cell depends on (reads a name they store, directly or through
    other such cells); an optional, ungraded exercise (08's batch_renorm) has none and is skipped."""
    solutions = [c for c in cells if c.kind == "solution" and regions(c.source)]
    flow = {c.grade_id: _stored_and_loaded(c.source) for c in cells}
    read = set().union(*(flow[c.grade_id][1] for c in cells if c.kind == "test"))
    graded: list[Cell] = []
    changed = True
    while changed:
        changed = False
        for cell in solutions:
            if cell not in graded and _top_level(cell.source) & read:
                graded.append(cell)
                read |= flow[cell.grade_id][1]
                changed = True
    return [c for c in solutions if c in graded]


def ungraded_solution_cells(name: str) -> list[str]:
    cells = read_cells(SOLUTIONS / f"{name}.ipynb")
    graded = graded_solution_cells(cells)
    return [c.grade_id for c in cells if c.kind == "solution" and regions(c.source) and c not in graded]


def notebook_mutants(name: str) -> list[Mutant]:
    """Every mutant of the graded solution cells of one notebook of solutions/batch_norm."""
    return [m for c in graded_solution_cells(read_cells(SOLUTIONS / f"{name}.ipynb")) for m in mutants_of(c)]


def sample(mutants: list[Mutant], k: int, seed: int = 0) -> list[Mutant]:
    """A fixed random sample of k mutants (all if fewer), in generation order."""
    if len(mutants) <= k:
        return list(mutants)
    chosen = set(random.Random(seed).sample(range(len(mutants)), k))
    return [m for i, m in enumerate(mutants) if i in chosen]


# ---------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    id: str
    status: str                 # reference | killed | timeout | crashed | equivalent | survived
    failed: list = field(default_factory=list)      # test cells that failed
    errors: dict = field(default_factory=dict)      # non-test cells that raised: grade_id -> message
    battery: list = field(default_factory=list)     # probes that disagree (survived) / ran (equivalent)
    seconds: float = 0.0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _exec_cell(source: str, ns: dict, name: str) -> str | None:
    """Run one cell as nbgrader would; the failure message, or None if it raised nothing and wrote
    nothing to stderr."""
    err, out = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    fd_copy = os.dup(2)
    with tempfile.TemporaryFile() as fd_file:
        os.dup2(fd_file.fileno(), 2)
        sys.stdout, sys.stderr = out, err
        message = None
        try:
            with warnings.catch_warnings():  # a warning is printed to stderr, as the kernel does
                warnings.showwarning = _show_warning
                exec(compile(source, name, "exec"), ns)
        except BaseException as error:  # noqa: BLE001 - a cell's error is a result, as in a kernel
            message = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            sys.stdout, sys.stderr = saved
            sys.stderr.flush()
            os.dup2(fd_copy, 2)
            os.close(fd_copy)
            fd_file.seek(0)
            fd_text = fd_file.read().decode(errors="replace")
        if message is None and (err.getvalue() or fd_text):
            message = f"stderr: {(err.getvalue() + fd_text)[:300]}"
    return message


def _run_chain(cells: list[Cell], ns: dict, mutant: Mutant | None) -> Outcome:
    outcome = Outcome(mutant.id if mutant else "reference", "reference")
    for cell in cells:
        source = mutant.source if mutant and cell.grade_id == mutant.cell else cell.source
        message = _exec_cell(source, ns, cell.grade_id)
        if message is None:
            continue
        if cell.kind == "test":
            outcome.failed.append(cell.grade_id)
            outcome.errors[cell.grade_id] = message
        else:
            outcome.errors[cell.grade_id] = message
    return outcome


def _namespace(cells, base, mutant) -> dict:
    """A fresh namespace with the chain's non-test cells run in it (the battery's view)."""
    ns = dict(base)
    for cell in cells:
        if cell.kind != "test":
            _exec_cell(mutant.source if mutant and cell.grade_id == mutant.cell else cell.source, ns, cell.grade_id)
    return ns


def _child(cells, base, mutant, battery, write_fd) -> None:
    """In the forked child: the mutant's chain, then (if it survives) the battery."""
    ns = vars(sys.modules["__main__"])
    start = time.perf_counter()
    outcome = _run_chain(cells, ns, mutant)
    if mutant is None and battery is not None:  # the battery's own check: no probe fails on the reference
        outcome.battery = battery.broken(_namespace(cells, base, None))
    if mutant is not None:
        if outcome.failed:
            outcome.status = "killed"
        elif battery is None:
            outcome.status, outcome.battery = "survived", ["no battery for this notebook"]
        else:
            ref, mut = _namespace(cells, base, None), _namespace(cells, base, mutant)
            names = set().union(*(_stored_and_loaded(c.source)[0] for c in cells if c.kind == "solution"))
            disagree, ran = battery(ref, mut, names)
            outcome.status = "survived" if disagree else "equivalent"
            outcome.battery = disagree or [f"all {len(ran)} probes agree"]
    outcome.seconds = time.perf_counter() - start
    os.write(write_fd, json.dumps(asdict(outcome)).encode())


def _kill_group(pgid: int) -> None:
    """Kill what is left of a mutant's process group: processes it forked (d2lite.map_ranks' ranks)
    and did not reap, because it was killed at its time limit or its ranks hung. Left alive, they
    would keep the worker's stdout/stderr open and `run_in_worker` waiting for ever."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _forked(cells, base, mutant, battery, timeout: float) -> Outcome:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            os.setpgid(0, 0)  # its own process group: whatever it starts (a notebook's ranks) ends with it
            _child(cells, base, mutant, battery, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks, deadline, start = [], time.monotonic() + timeout, time.perf_counter()
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([read_fd], [], [], max(left, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    _kill_group(pid)
    name = mutant.id if mutant else "reference"
    if not chunks:
        kind = "timeout" if time.monotonic() >= deadline else "crashed"
        return Outcome(name, kind, seconds=time.perf_counter() - start,
                       errors={"child": f"exit status {status}"})
    return Outcome(**json.loads(b"".join(chunks)))


def run_notebook(path: Path, mutants: list[Mutant], timeout: float | None = None,
                 battery=None) -> tuple[Outcome, list[Outcome], float]:
    """In this process (a worker): setup once, then the reference and every mutant each in a fork.
    Returns (the reference's outcome, the mutants' outcomes, the setup's seconds)."""
    import torch

    torch.set_num_threads(1)
    os.chdir(path.parent)
    cells = read_cells(path)
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    ns = vars(main)
    start = time.perf_counter()
    for cell in cells:
        if cell.kind == "setup":
            message = _exec_cell(cell.source, ns, "setup")
            if message:
                raise RuntimeError(f"{path.name}: the setup cell failed: {message}")
    setup_seconds = time.perf_counter() - start
    base = dict(ns)
    chain = needed_cells(cells)
    reference = _forked(chain, base, None, battery, timeout or 600)
    if reference.failed or reference.status != "reference":
        raise RuntimeError(f"{path.name}: the reference fails its own tests: {reference}")
    limit = timeout or max(20.0, 10 * reference.seconds)
    outcomes = []
    for mutant in mutants:
        outcome = _forked(chain, base, mutant, battery, limit)
        if outcome.status == "timeout":  # forked gloo ranks can deadlock now and then: one more try
            outcome = _forked(chain, base, mutant, battery, limit)
        outcomes.append(outcome)
    return reference, outcomes, setup_seconds


# ---------------------------------------------------------------------------------------- d2lite grade
def grade_mutants(workdir: Path, picks: list[tuple[str, "Mutant"]]) -> list[tuple[str, "Mutant", float, float]]:
    """Submit each (notebook, mutant) as a student of a fresh course in ``workdir`` and grade them all
    with `d2lite grade` (the sandbox: root, bubblewrap, cgroups). Returns (notebook, mutant, score, max)."""
    from notebook_utils import ASSIGNMENT, nbgrader_env, new_course

    from d2lite.grading.runner import grade

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = nbgrader_env()["PATH"]
    try:
        root = workdir / "course"
        new_course(root, workdir / "exchange")
    finally:
        os.environ["PATH"] = path
    students = {}
    for i, (name, mutant) in enumerate(picks):
        student = f"mutant{i:03d}"
        students[student] = (name, mutant)
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nb = nbformat.read(str(SOLUTIONS / f"{name}.ipynb"), as_version=4)
        next(c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == mutant.cell).source = \
            mutant.source
        nbformat.write(nb, str(folder / f"{name}.ipynb"))
    rows = {(r.student, r.notebook): r for r in grade(root, ASSIGNMENT, echo=lambda *a: None, progress=False)}
    return [(name, mutant, rows[(student, name)].score, rows[(student, name)].max_score)
            for student, (name, mutant) in students.items()]


# ---------------------------------------------------------------------------------------- workers
def worker_main(argv: list[str]) -> None:
    """python tests/mutation.py NOTEBOOK_PATH MUTANTS_JSON OUT_JSON [TIMEOUT]"""
    sys.path.insert(0, str(Path(__file__).parent))
    from mutation_batteries import BATTERIES

    path, mutants_file, out_file = Path(argv[0]), argv[1], argv[2]
    timeout = float(argv[3]) if len(argv) > 3 and argv[3] != "auto" else None
    mutants = [Mutant(**m) for m in json.loads(Path(mutants_file).read_text())]
    reference, outcomes, setup = run_notebook(path, mutants, timeout, BATTERIES.get(path.stem))
    Path(out_file).write_text(json.dumps({"reference": asdict(reference), "setup_seconds": setup,
                                          "outcomes": [asdict(o) for o in outcomes]}))


def run_in_worker(path: Path, mutants: list[Mutant], timeout: float | None = None) -> dict:
    """One fresh worker process for one notebook, under the grading budget; its results as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        m_file, out_file = Path(tmp) / "mutants.json", Path(tmp) / "out.json"
        m_file.write_text(json.dumps([asdict(m) for m in mutants]))
        env = {**os.environ, "D2LITE_BUDGET": "grading", "NBGRADER_EXECUTION": "autograde",
               "MPLBACKEND": "Agg", "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, str(path), str(m_file), str(out_file),
                               str(timeout or "auto")], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"the mutation worker for {path.name} failed:\n{done.stderr[-4000:]}")
        result = json.loads(out_file.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        result["outcomes"] = [Outcome(**o) for o in result["outcomes"]]
        return result


if __name__ == "__main__":
    worker_main(sys.argv[1:])
