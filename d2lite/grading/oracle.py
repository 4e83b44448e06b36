"""The student's process: an oracle that runs answer cells and answers the checker's requests with data.

Runs in a fresh fork of the warm server (zygote.py), as `nobody`. It never sees a test cell. The
checker (checker.py, another process and user) sends requests: run this cell; what is this name;
call this function, read this attribute, with these arguments. Arguments arrive pickled from the
checker (the trusted side); answers leave as plain data (transport.encode_value). Objects that must
stay here (modules, the student's own classes, tensors that carry an autograd graph) become handles.

Nothing here is trusted by the grader: a student can rewrite any of it from their own code, and
that only changes what their own functions answer. What the checker concludes from the answers,
and which tests pass, is decided in the checker.
"""
from __future__ import annotations

import base64
import io
import os
import pickle
import sys
import traceback
import types
import warnings

from . import transport

MAX_CELL_OUTPUT = 20_000
_ERRORS_SHOWN = 3


class _Capped(io.TextIOBase):
    def __init__(self, limit: int) -> None:
        self.parts, self.size, self.limit, self.dropped = [], 0, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def value(self) -> str:
        out = "".join(self.parts)
        return out + (f"\n… {self.dropped} more characters not shown" if self.dropped else "")


def _student_traceback(exc: BaseException) -> list[str]:
    """The frames of the student's own cells (not the grader's or the libraries'), last first."""
    lines = []
    for frame in traceback.extract_tb(exc.__traceback__):
        name = frame.filename or ""
        if "ipython-input" in name or name.startswith("<"):
            lines.append(f"line {frame.lineno}, in {frame.name}: {(frame.line or '').strip()}"[:300])
    return lines[-_ERRORS_SHOWN:]


def _error(exc: BaseException) -> dict:
    return {"type": type(exc).__name__[:100], "msg": str(exc)[:4000], "tb": _student_traceback(exc)}


class _Callback:
    """A callable or iterator that lives in the checker (a lambda, a generator of a test cell)."""

    def __init__(self, oracle: "Oracle", cbid: int, kind: str) -> None:
        self._oracle, self._cbid, self._kind = oracle, cbid, kind

    def __call__(self, *args, **kwargs):
        return self._oracle.callback(self._cbid, "call", args, kwargs)

    def __iter__(self):
        return self

    def __next__(self):
        return self._oracle.callback(self._cbid, "next", (), {})

    def __repr__(self) -> str:
        return f"<the checker's {self._kind}>"


class _Pristine:
    """PyTorch's autograd entry points as they were before any student code ran: the checker's
    gradient requests go through these, whatever the student's code rebound or rewrote since."""

    def __init__(self) -> None:
        import torch
        import torch.autograd.graph
        from torch.autograd.variable import Variable

        self.attrs = [(owner, name, owner.__dict__[name]) for owner, name in (
            (torch.autograd, "grad"), (torch.autograd, "backward"), (torch.Tensor, "backward"),
            (torch.autograd.graph, "_engine_run_backward"), (torch.autograd, "_engine_run_backward"),
            (Variable, "_execution_engine")) if name in owner.__dict__]
        self.code = [(fn, fn.__code__) for _, _, fn in self.attrs if isinstance(fn, types.FunctionType)]
        self.funcs = {("torch.autograd", "grad"): torch.autograd.grad,
                      ("torch.autograd", "backward"): torch.autograd.backward,
                      ("torch.Tensor", "backward"): torch.Tensor.backward}

    def __enter__(self):
        self.saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in self.attrs]
        self.saved_code = [(fn, fn.__code__) for fn, _ in self.code]
        for owner, name, value in self.attrs:
            setattr(owner, name, value)
        for fn, code in self.code:
            fn.__code__ = code
        return self

    def __exit__(self, *exc):
        for fn, code in self.saved_code:
            fn.__code__ = code
        for owner, name, value in self.saved:
            setattr(owner, name, value)
        return False


def _refused(*args, **kwargs):
    raise RuntimeError("library normalization is unavailable in this check: compute it yourself with "
                       "tensor operations (mean, var, sqrt, ...)")


class _Block:
    """Library normalization unavailable while a structural check runs the student's function:
    the ATen kernels raise (at the dispatcher, so for every thread and every alias), and so do
    d2lite's own batch_norm and, where the check says so, autograd."""

    OPS = {"batch_norm": ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit.no_stats",
                          "_native_batch_norm_legit_no_training", "_batch_norm_with_update",
                          "_batch_norm_no_update", "batch_norm_update_stats"),
           "layer_norm": ("native_layer_norm",),
           "group_norm": ("native_group_norm",)}

    def __init__(self, families) -> None:
        self.families = set(families or ())

    def __enter__(self):
        import torch

        import d2lite.functional as functional

        self.lib, self.code, self.attrs = None, [], []

        ops = [op for family in self.families for op in self.OPS.get(family, ())]
        if ops:
            self.lib = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for op in ops:
                    try:
                        self.lib.impl(op, _refused, "CPU")
                    except (RuntimeError, ValueError):
                        pass  # an op this torch does not have
        if "batch_norm" in self.families:
            import d2lite.syncbn as syncbn

            targets = [functional.batch_norm, syncbn.sync_batch_norm]
            for owner, name in ((functional, "_BatchNormTrain"), (syncbn, "_SyncBatchNormTrain")):
                forward = getattr(owner, name, None)
                if forward is not None:
                    targets.append(forward.__dict__["forward"].__func__)
            for fn in targets:
                if not fn.__code__.co_freevars:
                    self.code.append((fn, fn.__code__))
                    fn.__code__ = _refused.__code__
        if "autograd" in self.families:
            from torch.autograd.variable import Variable

            class NoEngine:  # the engine every route into autograd calls, however it was reached
                def run_backward(self, *args, **kwargs):
                    raise RuntimeError("autograd is unavailable in this check: compute the gradients by hand")

                queue_callback = run_backward

            self.attrs.append((Variable, "_execution_engine", Variable.__dict__["_execution_engine"]))
            Variable._execution_engine = NoEngine()
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self.attrs):
            setattr(owner, name, value)
        for fn, code in reversed(self.code):
            fn.__code__ = code
        if self.lib is not None:
            self.lib._destroy()
        return False


_MISSING = object()


class _Library:
    """d2lite.distributed as it was before any student code ran. The checker's ``map_ranks`` (…)
    run here, in the student's process, so that the ranks run the student's functions; each call
    first puts back the module's functions and globals (and their code and defaults) as they were,
    so a patch of ``launch`` or ``_map_rank`` through an alias the source policy does not see cannot
    replace what the ranks are given or what they return."""

    # what the ranks and the parent's decoding of their results run on: put back as it was, too, so
    # that a patch of torch.load (or of what it calls) cannot rewrite the results on their way back
    GUARDED = ("torch.serialization", "torch._utils", "torch.storage", "pickle", "copyreg", "io",
               "multiprocessing.connection", "multiprocessing.process", "torch.distributed.distributed_c10d")

    def __init__(self, forget=None) -> None:
        import builtins
        import importlib

        import d2lite.distributed as module

        module._forget_in_rank = forget
        self.module = module
        self.names = dict(vars(module))
        self.code = [(f, f.__code__, f.__defaults__, f.__kwdefaults__) for f in self.names.values()
                     if isinstance(f, types.FunctionType) and f.__module__ == module.__name__]
        self.builtins = set(vars(builtins))
        self.guarded = [(m, dict(vars(m))) for m in map(importlib.import_module, self.GUARDED)]
        import multiprocessing.connection as connection
        import torch

        self.classes = [(c, dict(vars(c))) for c in (connection.Connection, connection._ConnectionBase)]
        self.attrs = [(torch, name, getattr(torch, name)) for name in ("load", "save", "frombuffer", "tensor")]
        for _, names in self.guarded + self.classes:
            self.code += [(f, f.__code__, f.__defaults__, f.__kwdefaults__) for f in names.values()
                          if type(f) is types.FunctionType]  # not isinstance: no __class__ read (c10d's reduce_op warns)

    def get(self, name: str):
        if name not in self.names["STUDENT_SIDE"]:
            raise ValueError(f"not a d2lite function that runs here: {name!r}")
        current = vars(self.module)
        for key in [k for k in current if k not in self.names]:
            del current[key]
        current.update(self.names)
        for f, code, defaults, kwdefaults in self.code:
            f.__code__, f.__defaults__, f.__kwdefaults__ = code, defaults, kwdefaults
        for module, names in self.guarded:
            current = vars(module)
            for key in [k for k in current if k not in names and k in self.builtins]:
                del current[key]  # a global that would shadow a builtin the module's code calls
            for key, value in names.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
        for cls, names in self.classes:
            for key in [k for k in vars(cls) if k not in names]:
                delattr(cls, key)
            for key, value in names.items():
                if key != "__dict__" and vars(cls).get(key, _MISSING) is not value:
                    setattr(cls, key, value)
        for owner, key, value in self.attrs:
            setattr(owner, key, value)
        return self.names[name]


class Oracle:
    def __init__(self, channel: transport.Channel) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.channel = channel
        self.shell = InteractiveShell.instance(colors="NoColor")
        self.ns = self.shell.user_ns
        self.handles: dict[int, object] = {}
        self.handle_ids: dict[int, int] = {}
        self.mirrors: dict[int, object] = {}       # the checker's tensors: cid -> this process's copy
        self.mirror_ids: dict[int, int] = {}
        self.snapshots: dict[int, tuple] = {}
        self.call_refs: dict[int, int] = {}        # id(module of this request) -> the checker's cid
        self.pristine = _Pristine()
        self.library = _Library(self.forget_in_rank)
        self.next_id = 0

    def forget_in_rank(self) -> None:
        """In a rank forked by d2lite.map_ranks (…), once it holds its own copies of its inputs: zero
        every tensor the checker has sent (the other ranks' parts, other tests' inputs), in this
        process's memory only, so that no search of the rank's memory finds them."""
        from d2lite.distributed import _wipe

        _wipe(list(self.mirrors.values()))

    # --- what leaves ---------------------------------------------------------------------------

    def handle(self, obj) -> dict:
        hid = self.handle_ids.get(id(obj))
        if hid is None or self.handles.get(hid) is not obj:
            hid = self.next_id
            self.next_id += 1
            self.handles[hid] = obj
            self.handle_ids[id(obj)] = hid
        kind = type(obj)
        return {"h": {"id": hid, "m": str(getattr(kind, "__module__", "") or "")[:200],
                      "q": str(getattr(kind, "__qualname__", "") or "")[:200]}}

    def ref(self, obj):
        cid = self.call_refs.get(id(obj))
        if cid is None:
            cid = self.mirror_ids.get(id(obj))
            if cid is not None and self.mirrors.get(cid) is not obj:
                cid = None
        return cid

    def encode(self, value):
        return transport.encode_value(value, self.handle, self.ref)

    def send(self, message: dict) -> None:
        import json

        self.channel.send(b"J", json.dumps(message, allow_nan=False).encode())

    # --- what arrives --------------------------------------------------------------------------

    def load(self, payload: bytes):
        """A request of the checker, and the ids of the objects in it that are this process's own."""
        oracle, own = self, set()

        class Loader(pickle.Unpickler):
            def persistent_load(self, pid):
                kind = pid[0]
                if kind == "t":
                    return oracle.mirror(*pid[1:])
                if kind == "s":
                    obj = oracle.handles[pid[1]]
                    own.add(id(obj))
                    return obj
                if kind == "cb":
                    return _Callback(oracle, pid[1], pid[2])
                raise pickle.UnpicklingError(f"unknown reference {kind!r}")

        return Loader(io.BytesIO(payload)).load(), own

    def mirror(self, cid: int, value, requires_grad: bool, is_param: bool, grad):
        import torch

        old = self.mirrors.get(cid)
        if value is None:  # unchanged since the checker last sent it
            if old is None:
                raise RuntimeError("the checker referred to a tensor it never sent")
            return old
        if old is not None and old.dtype == value.dtype and old.shape == value.shape \
                and old.requires_grad == requires_grad and isinstance(old, torch.nn.Parameter) == is_param \
                and torch.equal(old.detach(), value) and _same_grad(old.grad, grad):
            return old
        if is_param:
            new = torch.nn.Parameter(value, requires_grad=requires_grad)
        else:
            new = value.requires_grad_(requires_grad) if requires_grad else value
        if grad is not None:
            new.grad = grad
        self.mirrors[cid] = new
        self.mirror_ids[id(new)] = cid
        self.snapshots[cid] = _snapshot(new)
        return new

    # --- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        while True:
            try:
                kind, payload = self.channel.recv()
            except (EOFError, OSError):
                return 0
            if kind != b"P":
                return 3
            request, own = self.load(payload)
            del payload
            if request.get("op") == "exit":
                return 0
            self.answer(request, own)

    def wait_reply(self, rid: int):
        """Wait for the checker's answer to our callback ``rid``, serving its requests meanwhile."""
        while True:
            kind, payload = self.channel.recv()
            message, own = self.load(payload)
            del payload
            if "cb_re" in message and message["cb_re"] == rid:
                return message
            if message.get("op") == "exit":
                os._exit(0)
            self.answer(message, own)

    def callback(self, cbid: int, op: str, args, kwargs):
        rid = self.next_id
        self.next_id += 1
        self.send({"cb": cbid, "cbid": rid, "op": op, "args": self.encode(args), "kwargs": self.encode(kwargs)})
        reply = self.wait_reply(rid)
        if reply.get("ok"):
            return reply["value"]
        error = reply.get("error") or {}
        if error.get("type") == "StopIteration":
            raise StopIteration
        raise RuntimeError(f"the checker's callable raised {error.get('type')}: {error.get('msg')}")

    def answer(self, request: dict, own: set) -> None:
        import torch

        rid = request.get("id")
        context = request.get("ctx") or {}
        for cid in request.get("forget", ()):  # the checker's tensors it no longer holds
            old = self.mirrors.pop(cid, None)
            self.snapshots.pop(cid, None)
            if old is not None and self.mirror_ids.get(id(old)) == cid:
                del self.mirror_ids[id(old)]
        for hid in request.get("release", ()):
            obj = self.handles.pop(hid, None)
            if obj is not None and self.handle_ids.get(id(obj)) == hid:
                del self.handle_ids[id(obj)]
        out, err = _Capped(MAX_CELL_OUTPUT), _Capped(MAX_CELL_OUTPUT)
        saved = (sys.stdout, sys.stderr, torch.is_grad_enabled(), torch.get_default_dtype())
        objects = request.get("objects")
        outer_refs, self.call_refs = self.call_refs, {}
        before = {}
        try:
            sys.stdout, sys.stderr = out, err
            if "rng" in context:
                rng_before = torch.frombuffer(bytearray(context["rng"]), dtype=torch.uint8)
                torch.set_rng_state(rng_before)
            if "grad" in context:
                torch.set_grad_enabled(context["grad"])
            if "dtype" in context:
                torch.set_default_dtype(getattr(torch, context["dtype"]))
            for hid in request.get("from_handles", ()):
                if hid in self.handles:
                    own.add(id(self.handles[hid]))
            modules = transport.modules_in(objects, skip=frozenset(own)) if objects is not None else []
            cids = request.get("modules", [])
            if len(cids) != len(modules):
                raise RuntimeError("the checker and the oracle disagree on the modules sent")
            for cid, module in zip(cids, modules):
                self.call_refs[id(module)] = cid
                before[cid] = (module, _module_state(module))
            with _Block(context.get("block")):
                value = self.perform(request)
            reply = {"re": rid, "ok": True, "value": self.encode(value)}
        except BaseException as exc:  # noqa: BLE001 — the student's code raised: the checker decides what it means
            if isinstance(exc, (KeyboardInterrupt,)):
                raise
            reply = {"re": rid, "ok": False, "error": _error(exc)}
        finally:
            sys.stdout, sys.stderr = saved[0], saved[1]
            rng_after = torch.get_rng_state()
            torch.set_grad_enabled(saved[2])
            torch.set_default_dtype(saved[3])
        try:
            reply["sync"] = self.sync(before)
        except Exception as exc:  # noqa: BLE001
            reply = {"re": rid, "ok": False, "error": _error(exc)}
        if "rng" in context and rng_after.numpy().tobytes() != context["rng"]:
            reply["rng"] = base64.b64encode(rng_after.numpy().tobytes()).decode()
        reply["out"], reply["err"] = out.value(), err.value()
        try:
            self.send(reply)
        except (TypeError, ValueError) as exc:
            self.send({"re": rid, "ok": False, "error": _error(exc), "out": out.value(), "err": err.value()})
        finally:
            self.call_refs = outer_refs

    def sync(self, before: dict) -> dict:
        """What changed in the checker's objects while the student's code ran: tensors (values,
        requires_grad, grad) and, for modules sent in this request, their mode, attributes, and
        which tensors and children they hold."""
        tensors = []
        for cid, t in self.mirrors.items():
            snap = _snapshot(t)
            if snap != self.snapshots.get(cid):
                self.snapshots[cid] = snap
                tensors.append({"cid": cid, "value": {"T": transport.tensor_record(t)},
                                "grad": None if t.grad is None else {"T": transport.tensor_record(t.grad)},
                                "rg": bool(t.requires_grad)})
        modules = []
        for cid, (module, state) in before.items():
            after = _module_state(module)
            if after != state:
                modules.append({"cid": cid, "training": bool(module.training),
                                "attrs": self.encode({k: getattr(module, k) for k in after["attrs"]}),
                                "tensors": self.encode({k: v for k, v in list(module._parameters.items())
                                                        + list(module._buffers.items())}),
                                "kinds": {k: ("param" if k in module._parameters else "buffer")
                                          for k in list(module._parameters) + list(module._buffers)},
                                "children": self.encode(dict(module._modules))})
        return {"tensors": tensors, "modules": modules}

    def perform(self, request: dict):
        import copy

        op = request["op"]
        if op == "exec":
            return self.exec_cell(request["source"])
        if op == "files":
            return self.write_files(request["files"])
        if op == "exact_memory":  # before the checker measures this process's memory from outside
            return _exact_memory()
        if op == "name":
            name = request["name"]
            if name in self.ns and not name.startswith("__d2lite"):
                return {"found": True, "value": self.ns[name]}
            return {"found": False}
        if op == "library":  # d2lite's functions that run code in other processes (the ranks)
            return self.library.get(request["name"])
        if op == "torch":
            import torch

            owner, name = request["func"]
            if (owner, name) in self.pristine.funcs:  # gradients through PyTorch's own autograd
                with self.pristine:
                    return self.pristine.funcs[(owner, name)](*request["args"], **request["kwargs"])
            holder = {"torch": torch, "torch.Tensor": torch.Tensor, "torch.nn.functional": torch.nn.functional,
                      "torch.linalg": torch.linalg, "torch.special": torch.special}[owner]
            func = getattr(holder, name)
            return func(*request["args"], **request["kwargs"])
        target = request.get("target")
        if op == "getattr":
            return getattr(target, request["name"])
        if op == "setattr":
            return setattr(target, request["name"], request["value"])
        if op == "delattr":
            return delattr(target, request["name"])
        if op == "call":
            return target(*request["args"], **request["kwargs"])
        if op == "getitem":
            return target[request["key"]]
        if op == "setitem":
            target[request["key"]] = request["value"]
            return None
        if op == "len":
            return len(target)
        if op == "iter":
            items = []
            for i, item in enumerate(target):
                if i >= 100_000:
                    raise RuntimeError("iterated over more than 100,000 items")
                items.append(item)
            return items
        if op in ("repr", "str"):
            return (repr if op == "repr" else str)(target)[:transport.MAX_TEXT]
        if op == "format":
            return format(target, request["spec"])[:transport.MAX_TEXT]
        if op == "isinstance":
            return isinstance(request["args"][0], target)
        if op == "deepcopy":
            return copy.deepcopy(target)
        if op == "copy":
            return copy.copy(target)
        raise RuntimeError(f"unknown request {op!r}")

    def exec_cell(self, source: str) -> dict:
        try:
            result = self.shell.run_cell(source, store_history=False, silent=False)
        except BaseException as exc:  # noqa: BLE001 — SystemExit and friends from student code
            return {"ok": False, "error": _error(exc)}
        exc = result.error_before_exec or result.error_in_exec
        if exc is not None:
            return {"ok": False, "error": _error(exc)}
        return {"ok": True}

    @staticmethod
    def write_files(files: dict) -> int:
        for rel, data in files.items():
            path = os.path.normpath(rel)
            if path.startswith(("/", "..")):  # relative paths only: never outside home
                continue
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(base64.b64decode(data))
        return len(files)


def _same_grad(a, b) -> bool:
    import torch

    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _snapshot(t) -> tuple:
    g = t.grad
    return (t._version, id(t), bool(t.requires_grad), None if g is None else (id(g), g._version))


def _module_state(module) -> dict:
    attrs = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and transport.is_plain(v)}
    return {"training": module.training, "attrs": attrs,
            "tensors": {k: id(v) for k, v in list(module._parameters.items()) + list(module._buffers.items())},
            "children": {k: id(v) for k, v in module._modules.items()}}


def _exact_memory() -> None:
    """Large blocks (1 MiB and up) straight from and back to the kernel, so that the process's
    resident memory, which the checker reads from outside, follows what it holds (glibc's dynamic
    threshold would otherwise keep freed tensors resident for a while). Asked for by the checker
    before it measures (it slows training down, so not before)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> int:
    """The oracle's entry point in the sandbox: requests on fd 3, answers on fd 4."""
    channel = transport.Channel(3, 4)
    sys.stdin = open(os.devnull)
    sys.path.append(os.getcwd())  # the student's own modules, after the library's

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import matplotlib

    matplotlib.use("Agg")
    import d2lite  # noqa: F401  (imported before any student code: a shadowing d2lite.py is not loaded)

    return Oracle(channel).serve()
