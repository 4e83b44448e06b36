"""The source policy: a teaching aid and defence in depth, not the boundary.

Grades do not depend on it: the tests run in the checker, outside the student's process, and judge
values (checker.py). The policy reads the student's code as IPython will run it (after its input
transforms: a leading ``%magic``, an indented cell, ``>>> `` prompts) and reports what graded code
should not do, each finding with its line:

- ``syntax``: the cell cannot be parsed even after the transforms (it fails when it runs);
- ``structure``: a solution cell names a library normalization (``F.batch_norm``, ``nn.BatchNorm1d``);
- ``machinery``: code that reaches into the runtime (RestrictedPython's policy, Zope's: no names or
  attributes beginning with an underscore, no exec/eval; plus no getattr/setattr on modules,
  vars/globals/compile/__import__/get_ipython, no imports of introspection or code-loading modules,
  no attribute writes on imported modules, no ``torch.ops``/``torch.library``).

A ``structure`` or ``machinery`` finding costs only the points of the checks it concerns: the
structural ("does the work itself") tests, whose library block runs inside the student's process.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["Flag", "check_cell", "structure_names"]

# getattr/setattr/delattr/hasattr are allowed on objects (a network's layers by name), not on modules
# and not with a literal name beginning with an underscore
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "delattr", "hasattr"}
# dunders ordinary code needs (super().__init__(), type(x).__name__); __globals__, __code__,
# __dict__, __subclasses__, __builtins__ ... stay forbidden
ALLOWED_DUNDERS = {"__init__", "__name__", "__qualname__", "__doc__", "__class__",
                   # the protocol methods an ordinary class defines (a layer, a small container)
                   "__call__", "__repr__", "__str__", "__format__", "__eq__", "__ne__", "__lt__", "__le__",
                   "__gt__", "__ge__", "__hash__", "__bool__", "__len__", "__iter__", "__next__", "__getitem__",
                   "__setitem__", "__contains__", "__enter__", "__exit__", "__add__", "__radd__", "__sub__",
                   "__mul__", "__rmul__", "__truediv__", "__neg__", "__post_init__"}
FORBIDDEN_CALLS = {"vars", "globals", "locals", "exec", "eval", "compile",
                   "__import__", "get_ipython", "breakpoint", "memoryview", "attrgetter", "methodcaller"}
FORBIDDEN_MODULES = {"importlib", "ctypes", "gc", "inspect", "sys", "builtins", "IPython", "types", "marshal",
                     "pickle", "dill", "cloudpickle", "copyreg", "code", "codeop", "runpy", "pkgutil",
                     "imp", "zipimport", "threading", "_thread", "signal", "atexit", "traceback", "ipykernel",
                     "d2lite.grading", "torch.ops", "torch.library", "torch.overrides", "torch.utils",
                     "torch._C", "torch._dynamo"}
FORBIDDEN_ATTRIBUTES = {"ops", "library", "overrides", "f_globals", "f_locals", "f_back", "gi_frame",
                        "attrgetter", "methodcaller", "modules"}
# attributes no exercise needs, on whatever object: a running frame's (the caller's locals: in a rank
# forked by map_ranks, the parent's arguments), the interpreter's (os.sys), the garbage collector's,
# and a module that another module holds (torch.nn.functional.torch: a module reached by a name the
# policy does not know as one)
NOWHERE_ATTRIBUTES = {"f_globals", "f_locals", "f_back", "f_code", "f_builtins", "f_trace", "gi_frame",
                      "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
                      "tb_frame", "tb_next", "exc_info", "exception", "_getframe", "get_objects",
                      "get_referrers", "get_referents", "settrace", "setprofile", "sys", "builtins",
                      "serialization", "torch", "connection", "reduction", "_thread", "threading",
                      "multiprocessing", "signal", "atexit"}
MODULE_NAMES = {"torch", "nn", "F", "dist", "d2lite", "np", "numpy", "plt", "matplotlib", "math", "os", "random",
                "functools", "itertools", "copy", "collections", "torchvision", "tqdm", "nbformat"}
# magics an honest notebook uses (they measure or display, and reach nothing)
HARMLESS_MAGICS = {"time", "timeit", "matplotlib", "precision", "who", "whos", "pwd", "config", "prun"}
_KEYWORDS = ("batch_norm", "instance_norm", "layer_norm", "group_norm")


@dataclass(frozen=True)
class Flag:
    """One finding: ``kind`` is "syntax", "structure" or "machinery" (see the module's docstring)."""

    kind: str
    cell: str
    line: int
    code: str
    why: str

    def __str__(self) -> str:
        return f"{self.cell}, line {self.line}: `{self.code}` — {self.why}"


def structure_names(dotted: list[str]) -> set[str]:
    """The attribute/function names a does-the-work-itself test forbids (``F.batch_norm`` ->
    ``batch_norm``), widened to the ATen spellings of the same op (``native_batch_norm``)."""
    names = set()
    classes = {"batch_norm": ("BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
                              "LazyBatchNorm2d", "LazyBatchNorm3d", "SyncBatchNorm", "convert_batchnorm"),
               "instance_norm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
               "layer_norm": ("LayerNorm",), "group_norm": ("GroupNorm",)}
    if any(key in name.rpartition(".")[2] for name in dotted for key in _KEYWORDS):
        # any library normalization can stand in for another (layer norm over a channel is batch norm)
        for key in _KEYWORDS:
            names |= {key, "native_" + key, *classes[key]}
    for name in dotted:
        last = name.rpartition(".")[2]
        if any(key in last for key in _KEYWORDS):
            names |= {last, "native_" + last}
    return names


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
    return names


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node


def transform(source: str) -> str:
    """The cell's code as IPython will run it (its input transforms applied)."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 — a cell the transforms cannot take is checked as written
        return source


def check_cell(source: str, cell: str, *, module_names: set[str] = frozenset(),
               structure: set[str] = frozenset(), own_modules: set[str] = frozenset()) -> list[Flag]:
    """Findings in one student-written code cell, read as it will run (after IPython's transforms).
    ``own_modules``: the submission's own modules (its .py files): what comes from them is not a library's."""
    from RestrictedPython import compile_restricted_exec

    source = transform(source)
    lines = source.splitlines()

    def quote(lineno: int | None) -> str:
        if lineno and 0 < lineno <= len(lines):
            return lines[lineno - 1].strip()[:160]
        return ""

    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [Flag("syntax", cell, error.lineno or 0, quote(error.lineno),
                     f"cannot be parsed as Python ({error.msg}); the cell fails when it runs")]
    except (ValueError, RecursionError, MemoryError) as error:
        return [Flag("syntax", cell, 0, "", f"cannot be parsed ({type(error).__name__})")]
    flags: list[Flag] = []
    for error in compile_restricted_exec(source).errors:
        match = re.match(r"Line (\d+): (.*)", error)
        lineno, why = (int(match.group(1)), match.group(2)) if match else (None, error)
        if "invalid variable name because it starts with \"_\"" in why and '"__' not in why:
            continue  # a private helper name (_helper) is harmless; dunders are not
        defined = re.match(r'"([^"]+)" is an invalid variable name', why)
        if defined and defined.group(1) in ALLOWED_DUNDERS:
            continue  # def __eq__(self, other): a class's own protocol method
        name = re.match(r'"([^"]+)" is an invalid attribute name', why)
        if name and (name.group(1) in ALLOWED_DUNDERS or re.fullmatch(r"_[A-Z]\w*", name.group(1))):
            continue  # super().__init__(), nn.modules.batchnorm._BatchNorm (a private class, read only)
        if "TryStar" in why:
            continue
        flags.append(Flag("machinery", cell, lineno or 0, quote(lineno), f"not allowed in graded code: {why}"))
    imported = _imported_names(tree)
    own = set()  # names bound by imports from the student's own modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in own_modules:
            own |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            own |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in own_modules}
    magics = {id(node.func.value.func) for node in ast.walk(tree)  # get_ipython() of an allowed %magic
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("run_line_magic", "run_cell_magic") and isinstance(node.func.value, ast.Call)
              and isinstance(node.func.value.func, ast.Name) and node.func.value.func.id == "get_ipython"
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in HARMLESS_MAGICS}
    modules = MODULE_NAMES | set(module_names) | imported
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    # a module bound to another name, put in a container or passed along: its attributes can then be
    # changed where the check of attribute writes above does not see it (``m = d2lite; m.f = g``)
    plain_modules = MODULE_NAMES | set(module_names) | {
        (a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    read_through = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # names bound to something read off a module (``m = d2lite.distributed``, ``f = torch.save``):
    # writing their attributes patches the library as writing the module's would
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Attribute):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in modules:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                modules = modules | {t.id for t in targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in plain_modules and isinstance(node.ctx, ast.Load) \
                and id(node) not in read_through and node.id not in own:
            line = getattr(node, "lineno", 0)
            flags.append(Flag("machinery", cell, line, quote(line),
                              f"uses the module {node.id} as a value (a new name for it, an argument, an "
                              "item), through which graded code could patch it"))
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_FUNCTIONS:
            target = node.args[0] if node.args else None
            attr = node.args[1] if len(node.args) > 1 else None
            if target is None or (isinstance(_root(target), ast.Name) and _root(target).id in modules) \
                    or not isinstance(attr, (ast.Name, ast.Constant)) \
                    or (isinstance(attr, ast.Constant) and str(attr.value).startswith("_")) \
                    or (isinstance(attr, ast.Constant) and str(attr.value) in NOWHERE_ATTRIBUTES):
                flags.append(Flag("machinery", cell, line, quote(line),
                                  f"{node.func.id}() on a module, or with a computed or private name, can "
                                  "reach into the grader's machinery"))
            elif isinstance(attr, ast.Constant) and str(attr.value) in structure:
                flags.append(Flag("structure", cell, line, quote(line),
                                  f"reaches the library's {attr.value} instead of doing the work itself"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS \
                and id(node.func) not in magics:
            flags.append(Flag("machinery", cell, line, quote(line),
                              f"calls {node.func.id}(), which can reach into the grader's machinery"))
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_CALLS | ATTRIBUTE_FUNCTIONS \
                and isinstance(node.ctx, ast.Load) and id(node) not in called and id(node) not in magics:
            flags.append(Flag("machinery", cell, line, quote(line), f"uses {node.id}, which can reach into the "
                              "grader's machinery"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom):
                mods += [f"{node.module}.{a.name}" for a in node.names]
            for mod in mods:
                if any(mod == m or mod.startswith(m + ".") for m in FORBIDDEN_MODULES):
                    flags.append(Flag("machinery", cell, line, quote(line), f"imports {mod}, which graded "
                                      "code may not use"))
                    break
            for alias in node.names:
                if alias.name.rpartition(".")[2] in structure and (alias.asname or alias.name) not in own:
                    flags.append(Flag("structure", cell, line, quote(line),
                                      f"imports the library's {alias.name} instead of doing the work itself"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for t in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                    root = _root(t)
                    if isinstance(t, (ast.Attribute, ast.Subscript)) and isinstance(root, ast.Name) \
                            and root.id in modules:
                        flags.append(Flag("machinery", cell, line, quote(line),
                                          f"changes the imported module {root.id}; graded code may not "
                                          "patch libraries"))
        elif isinstance(node, ast.Attribute):
            if node.attr in NOWHERE_ATTRIBUTES or (node.attr in FORBIDDEN_ATTRIBUTES
                                                   and isinstance(_root(node), ast.Name)
                                                   and _root(node).id in modules | {"torch"}):
                flags.append(Flag("machinery", cell, line, quote(line),
                                  f"uses .{node.attr}, which graded code may not use"))
            if node.attr in structure and not (isinstance(_root(node), ast.Name) and _root(node).id in own):
                flags.append(Flag("structure", cell, line, quote(line),
                                  f"calls the library's {node.attr} instead of doing the work itself"))
        elif isinstance(node, ast.Name) and node.id in structure and isinstance(node.ctx, ast.Load) \
                and node.id in imported and node.id not in own:
            flags.append(Flag("structure", cell, line, quote(line),
                              f"uses the library's {node.id} instead of doing the work itself"))
    unique, seen = [], set()
    for flag in flags:
        key = (flag.kind, flag.line, flag.why)
        if key not in seen:
            seen.add(key)
            unique.append(flag)
    return unique
