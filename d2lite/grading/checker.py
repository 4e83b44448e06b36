"""The checker: runs the instructor's test cells outside the student's process and decides which pass.

A process of its own in the sandbox, as a user the student's process cannot signal, trace or read.
It runs the locked instructor cells (setup) and every test cell in its own namespace. A name the
test uses that the checker does not define (the student's functions, variables, classes) is read
from the student's process (oracle.py) as a value or a handle: calling a handle, reading its
attributes or iterating over it asks the oracle, which answers with data. Expected values, every
comparison and the framing of cells (which ran, which passed, what the feedback says) are computed
here; the worker that started both processes only reads this process's records.

What the oracle says is read with the strict decoder of transport.py; whatever it sends that is
malformed, oversized or too deep fails the check that asked for it, with the reason.
"""
from __future__ import annotations

import base64
import builtins
import io
import json
import os
import pickle
import sys
import time
import traceback
import types
import weakref

from . import transport
from .transport import Malformed

MAX_CELL_OUTPUT = 20_000
_LOCAL_NAMES = {"detach", "detach_", "size", "dim", "numel", "item", "tolist", "equal", "eq", "ne", "lt", "le", "gt",
                "ge", "isfinite", "isnan", "isinf", "allclose", "isclose", "numpy", "element_size", "is_floating_point",
                "is_complex", "type", "data_ptr", "stride", "is_contiguous", "argmax", "argmin", "as_tensor",
                "__bool__", "__len__", "__repr__", "__str__", "__format__", "__eq__", "__ne__", "__lt__", "__le__",
                "__gt__", "__ge__", "__hash__", "__reduce_ex__", "__deepcopy__", "__array__", "__get__",
                "__setstate__", "__iter__", "__contains__", "count_nonzero", "nelement", "get_device", "__index__",
                "__int__", "__float__", "__complex__"}


class StudentError(Exception):
    """An exception the student's code raised whose type is not a Python built-in."""


class Stopped(Exception):
    """The student's process no longer answers (it timed out, exited or broke the protocol)."""


def _exception(error) -> BaseException:
    if not isinstance(error, dict):
        raise Malformed("a malformed error")
    kind, msg, tb = error.get("type"), error.get("msg"), error.get("tb", [])
    if not isinstance(kind, str) or not isinstance(msg, str) or not isinstance(tb, list) \
            or not all(isinstance(t, str) for t in tb):
        raise Malformed("a malformed error")
    kind, msg, tb = kind[:100], msg[:4000], [t[:300] for t in tb[-3:]]
    cls = getattr(builtins, kind, None)
    exc = None
    if isinstance(cls, type) and issubclass(cls, Exception) and cls is not StopIteration:
        try:
            exc = cls(msg)
        except Exception:  # noqa: BLE001 — exception types with other signatures
            exc = None
    if exc is None:
        exc = StudentError(f"{kind}: {msg}")
    exc.student_traceback = tb
    return exc


# --- handles: objects that stay in the student's process ------------------------------------

class Remote:
    """An object that lives in the student's process. Everything done to it is a request."""

    _client = None

    def __init__(self, client, hid):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_hid", hid)

    def _ask(self, op, **fields):
        return object.__getattribute__(self, "_client").request(op, target=self, **fields)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name, value):
        self._ask("setattr", name=name, value=value)

    def __delattr__(self, name):
        self._ask("delattr", name=name)

    @property
    def __class__(self):
        return object.__getattribute__(self, "_client").resolve(type(self))

    def __call__(self, *args, **kwargs):
        return self._ask("call", args=args, kwargs=kwargs)

    def __getitem__(self, key):
        return self._ask("getitem", key=key)

    def __setitem__(self, key, value):
        self._ask("setitem", key=key, value=value)

    def __len__(self):
        n = self._ask("len")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TypeError("len() of the student's object did not answer a non-negative int")
        return n

    def __iter__(self):
        items = self._ask("iter")
        if not isinstance(items, list):
            raise TypeError("iterating over the student's object did not answer a list")
        return iter(items)

    def __contains__(self, item):
        return any(x is item or (not isinstance(x, Remote) and x == item) for x in iter(self))

    def __bool__(self):
        return True  # an object's own truthiness would be its process's word: objects are true

    def __eq__(self, other):
        return self is other  # equality is never the student's process's word: identity

    def __ne__(self, other):
        return self is not other

    def __repr__(self):
        text = self._ask("repr")
        return text if isinstance(text, str) else "<an object of your code>"

    def __str__(self):
        text = self._ask("str")
        return text if isinstance(text, str) else "<an object of your code>"

    def __format__(self, spec):
        text = self._ask("format", spec=spec)
        return text if isinstance(text, str) else "<an object of your code>"

    def __hash__(self):
        return object.__hash__(self)

    def __instancecheck__(self, obj):
        return self._ask("isinstance", args=(obj,)) is True

    def __copy__(self):
        return self._ask("copy")

    def __deepcopy__(self, memo):
        return self._ask("deepcopy")

    def __reduce_ex__(self, protocol):
        raise TypeError("an object of the student's process cannot be pickled")


class _GradFn:
    """Stands for the autograd node of a tensor of the student's process (its name as reported)."""

    def __repr__(self) -> str:
        return "<an autograd node of your code>"


def _tensor_class():
    import torch

    class RemoteTensor(torch.Tensor):
        """A tensor the student's process returned that carries an autograd graph: its values are here;
        gradients through it are asked of the student's process, where the graph is."""

        @staticmethod
        def wrap(plain, client, hid, rg, gf, param):
            t = torch.Tensor._make_subclass(RemoteTensor, plain, False)
            t._client, t._hid, t._rg, t._gf = client, hid, rg, gf
            if param:
                t._is_param = True
            client.hold(t, hid)
            return t

        @property
        def requires_grad(self):
            return self._rg

        @property
        def grad_fn(self):
            return _GradFn() if self._gf else None

        @property
        def is_leaf(self):
            return not self._gf

        @property
        def grad(self):
            return self._client.request("getattr", target=self, name="grad")

        def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
            return self._client.request("torch", func=("torch.Tensor", "backward"),
                                        args=(self, gradient, retain_graph, create_graph, inputs), kwargs={})

        @classmethod
        def __torch_function__(cls, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            remote = [a for a in _flat((args, kwargs)) if isinstance(a, RemoteTensor)]
            name = getattr(func, "__name__", "")
            if remote and func in (torch.autograd.grad, torch.autograd.backward):
                return remote[0]._client.request("torch", func=("torch.autograd", name), args=args, kwargs=kwargs)
            with torch._C.DisableTorchFunctionSubclass():
                value = func(*_unwrap(args), **_unwrap(kwargs))  # the value: always computed here
            if remote and torch.is_grad_enabled() and any(t._rg for t in remote) and name not in _LOCAL_NAMES \
                    and isinstance(value, torch.Tensor) and value.is_floating_point():
                owner = _owner(func, name)
                if owner is not None:  # the same op there, for the graph that backward will need
                    there = remote[0]._client.request("torch", func=(owner, name), args=args, kwargs=kwargs)
                    if isinstance(there, RemoteTensor) and there.shape == value.shape:
                        return RemoteTensor.wrap(value.detach(), there._client, there._hid, there._rg, there._gf, False)
            return value

    return RemoteTensor


def _flat(value, depth=0):
    if depth > 6:
        return
    if type(value) in (list, tuple):  # type(): a handle may claim any class
        for v in value:
            yield from _flat(v, depth + 1)
    elif type(value) is dict:
        for v in value.values():
            yield from _flat(v, depth + 1)
    else:
        yield value


def _unwrap(value, depth=0):
    import torch

    if depth > 6:
        return value
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and hasattr(value, "_hid"):
        return value.as_subclass(torch.Tensor)
    if type(value) in (list, tuple):
        return type(value)(_unwrap(v, depth + 1) for v in value)
    if type(value) is dict:
        return {k: _unwrap(v, depth + 1) for k, v in value.items()}
    return value


def _owner(func, name):
    import torch

    if getattr(torch.Tensor, name, None) is func or getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")):
        return "torch.Tensor"
    for owner, module in (("torch", torch), ("torch.nn.functional", torch.nn.functional),
                          ("torch.linalg", torch.linalg), ("torch.special", torch.special)):
        if getattr(module, name, None) is func:
            return owner
    return None


# --- the client: requests out, answers read strictly -----------------------------------------

class Client:
    def __init__(self, channel: transport.Channel, deadline: float) -> None:
        import torch

        self.channel, self.deadline = channel, deadline
        self.next_id = 0
        self.tensors: dict[int, tuple[int, object]] = {}   # id(tensor) -> (cid, tensor): sent and kept
        self.objects: dict[int, object] = {}                # cid -> the checker's object
        self.proxies: dict[int, Remote] = {}
        self.classes: dict[tuple[str, str], type] = {}
        self.resolved: dict[type, type] = {}
        self.callbacks: dict[int, object] = {}
        self.block: set[str] | None = None
        self.output: list[str] = []
        self.stopped: str | None = None
        self.oracle_pid: int | None = None
        self.live: dict[int, int] = {}
        self.sent: dict[int, tuple] = {}                    # cid -> the tensor's state when last sent
        self.forgotten: list[int] = []                      # cids of sent tensors gone here
        self.release: list[int] = []
        self.RemoteTensor = _tensor_class()
        self.rng_size = torch.get_rng_state().numel()

    def hold(self, obj, hid: int) -> None:
        """Count the checker's live copies of a handle: when the last one is gone, the student's
        process is told it may drop the object (a dropped graph frees its memory there too)."""
        self.live[hid] = self.live.get(hid, 0) + 1
        weakref.finalize(obj, self._drop, hid)

    def _drop(self, hid: int) -> None:
        self.live[hid] -= 1
        if not self.live[hid]:
            del self.live[hid]
            self.release.append(hid)

    # the classes of handles: a proxy class named as the student's process names the type
    def proxy_class(self, module: str, qualname: str) -> type:
        key = (module, qualname)
        if key not in self.classes:
            self.classes[key] = type(qualname.rpartition(".")[2] or "object", (Remote,),
                                     {"__module__": module, "__qualname__": qualname})
        return self.classes[key]

    def resolve(self, proxy_class: type) -> type:
        """The class a handle claims to be, where the checker has it loaded already (torch's, d2lite's
        and the built-ins); otherwise the proxy class itself."""
        import torch

        if proxy_class not in self.resolved:
            module, qualname = proxy_class.__module__, proxy_class.__qualname__
            target = sys.modules.get(module) if module.split(".")[0] in ("torch", "d2lite") else None
            for part in qualname.split(".") if target is not None else ():
                target = getattr(target, part, None)
            # only layers (pure Python classes): a handle that passed for a tensor or a built-in
            # type would be taken for one by C code that trusts isinstance
            ok = isinstance(target, type) and issubclass(target, torch.nn.Module)
            self.resolved[proxy_class] = target if ok else proxy_class
        return self.resolved[proxy_class]

    # --- sending -------------------------------------------------------------------------------

    def _tensor_cid(self, t) -> int:
        entry = self.tensors.get(id(t))
        if entry is None or entry[1]() is not t:
            cid = self.next_id
            self.next_id += 1
            entry = (cid, weakref.ref(t))
            self.tensors[id(t)] = entry
            self.objects[cid] = weakref.ref(t)
            weakref.finalize(t, self._forget, id(t), cid)
        return entry[0]

    def _forget(self, key: int, cid: int) -> None:
        """A tensor the checker sent is gone here: its copy there may go too."""
        if key in self.tensors and self.tensors[key][0] == cid:
            del self.tensors[key]
        self.objects.pop(cid, None)
        self.sent.pop(cid, None)
        self.forgotten.append(cid)

    def dumps(self, message) -> bytes:
        import functools

        import torch

        client, raw = self, []

        class Dumper(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, torch.Tensor):
                    if any(obj is r for r in raw):
                        return None
                    if hasattr(obj, "_hid") and isinstance(obj, client.RemoteTensor):
                        return ("s", obj._hid)
                    cid = client._tensor_cid(obj)
                    grad = obj.grad if obj.is_leaf else None
                    state = (obj._version, bool(obj.requires_grad), id(grad), None if grad is None else grad._version)
                    if client.sent.get(cid) == state:  # the oracle's copy is up to date: no bytes again
                        return ("t", cid, None, state[1], isinstance(obj, torch.nn.Parameter), None)
                    client.sent[cid] = state
                    plain = obj.detach()
                    if type(plain) is not torch.Tensor:
                        plain = plain.as_subclass(torch.Tensor)
                    grad = None if grad is None else grad.detach().as_subclass(torch.Tensor)
                    raw.extend(r for r in (plain, grad) if r is not None)
                    return ("t", cid, plain, state[1], isinstance(obj, torch.nn.Parameter), grad)
                if isinstance(obj, Remote):
                    return ("s", object.__getattribute__(obj, "_hid"))
                if isinstance(obj, types.GeneratorType):
                    return ("cb", client._callback(obj), "iterator")
                if isinstance(obj, (types.FunctionType, functools.partial)) and not _importable(obj):
                    return ("cb", client._callback(obj), "function")
                return None

        buffer = io.BytesIO()
        Dumper(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
        return buffer.getvalue()

    def _callback(self, obj) -> int:
        cbid = self.next_id
        self.next_id += 1
        self.callbacks[cbid] = obj
        return cbid

    def request(self, op: str, **fields):
        import torch

        if self.stopped:
            raise Stopped(self.stopped)
        rid = self.next_id
        self.next_id += 1
        objects = tuple(fields.get(k) for k in ("target", "args", "kwargs", "value", "key", "item"))
        modules = transport.modules_in(objects)
        cids = []
        call_objects = {}
        for module in modules:
            cid = self.next_id
            self.next_id += 1
            cids.append(cid)
            call_objects[cid] = module
        from_handles = [object.__getattribute__(o, "_hid") for o in _flat(objects) if isinstance(o, Remote)]
        context = {"grad": torch.is_grad_enabled(), "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
                   "rng": torch.get_rng_state().numpy().tobytes()}  # bytes: a tensor here would be mirrored
        if self.block:
            context["block"] = sorted(self.block)
        release, self.release = [h for h in self.release if h not in self.live], []
        forget, self.forgotten = self.forgotten, []
        message = {"id": rid, "op": op, "ctx": context, "objects": objects, "modules": cids,
                   "from_handles": from_handles, "release": release, "forget": forget, **fields}
        try:
            self.channel.send(b"P", self.dumps(message))
        except OSError as error:
            self.stop(f"the notebook's process ended ({error})")
        self.objects.update(call_objects)
        try:
            reply = self.wait(rid)
            return self.read_reply(reply)
        finally:
            for cid in call_objects:
                self.objects.pop(cid, None)

    def stop(self, why: str):
        self.stopped = why
        raise Stopped(why)

    def wait(self, rid: int) -> dict:
        while True:
            try:
                kind, payload = self.channel.recv(self.deadline)
            except TimeoutError:
                self.stop("your code did not answer within the notebook's time limit")
            except (EOFError, OSError):
                self.stop("the notebook's process ended while a test was waiting for it (it exited, crashed, "
                          "or was stopped at a cap)")
            except Malformed as error:
                self.stop(f"the notebook's process broke the protocol ({error})")
            if kind != b"J":
                self.stop("the notebook's process broke the protocol (an unexpected message)")
            message = transport.decode_json(payload)
            if not isinstance(message, dict):
                self.stop("the notebook's process broke the protocol (an unexpected message)")
            if "cb" in message:
                self.serve_callback(message)
                continue
            if message.get("re") != rid:
                self.stop("the notebook's process broke the protocol (an answer to another question)")
            return message

    def serve_callback(self, message: dict) -> None:
        cbid, rid, op = message.get("cb"), message.get("cbid"), message.get("op")
        if not isinstance(rid, int) or op not in ("call", "next") or cbid not in self.callbacks:
            self.stop("the notebook's process broke the protocol (a malformed callback)")
        try:
            args = self.decode(message.get("args"))
            kwargs = self.decode(message.get("kwargs"))
            if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
                raise Malformed("malformed arguments")
            target = self.callbacks[cbid]
            value = target(*args, **kwargs) if op == "call" else next(target)
            reply = {"cb_re": rid, "ok": True, "value": value}
        except Stopped:
            raise
        except BaseException as error:  # noqa: BLE001 — passed on to the student's code, which called it
            reply = {"cb_re": rid, "ok": False, "error": {"type": type(error).__name__, "msg": str(error)[:2000]}}
        try:
            payload = self.dumps(reply)
        except Exception as error:  # noqa: BLE001
            payload = self.dumps({"cb_re": rid, "ok": False, "error": {"type": type(error).__name__, "msg": str(error)}})
        self.channel.send(b"P", payload)

    # --- reading -------------------------------------------------------------------------------

    def read_reply(self, reply: dict):
        import torch

        for key in ("out", "err"):
            text = reply.get(key, "")
            if isinstance(text, str) and text:
                self.output.append(text[:MAX_CELL_OUTPUT])
        rng = reply.get("rng")
        if rng is not None:
            try:
                raw = base64.b64decode(rng, validate=True) if isinstance(rng, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != self.rng_size:
                raise Malformed("a malformed random state")
            torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone())
        self.apply_sync(reply.get("sync"))
        ok = reply.get("ok")
        if ok is True:
            return self.decode(reply.get("value"))
        if ok is False:
            raise _exception(reply.get("error"))
        raise Malformed("an answer that is neither a value nor an error")

    def decode(self, data, plain: bool = False):
        import torch

        def tensor(spec, value):
            if spec["h"] is not None and not plain:
                return self.RemoteTensor.wrap(value, self, spec["h"], spec["rg"], spec["gf"], spec["param"])
            if spec["param"]:
                return torch.nn.Parameter(value, requires_grad=spec["rg"] and value.is_floating_point())
            if spec["rg"] and value.is_floating_point() and plain:
                value.requires_grad_(True)
            return value

        def handle(record):
            proxy = self.proxies.get(record["id"])
            if proxy is None:
                proxy = self.proxy_class(record["m"], record["q"])(self, record["id"])
                self.proxies[record["id"]] = proxy
            return proxy

        def ref(cid):
            obj = self.objects.get(cid)
            if isinstance(obj, weakref.ref):
                obj = obj()
            if obj is None:
                raise Malformed("a reference to an object the checker did not send")
            return obj

        return transport.decode_value(data, tensor=tensor, handle=handle, ref=ref)

    def apply_sync(self, sync) -> None:
        """Bring the checker's objects up to date with what the student's code did to its copies."""
        import torch

        if sync is None:
            return
        if not isinstance(sync, dict) or not isinstance(sync.get("tensors", []), list) \
                or not isinstance(sync.get("modules", []), list):
            raise Malformed("a malformed update")
        for entry in sync.get("tensors", []):
            if not isinstance(entry, dict) or not isinstance(entry.get("cid"), int):
                raise Malformed("a malformed update")
            target = self.objects.get(entry["cid"])
            target = target() if isinstance(target, weakref.ref) else target
            if not isinstance(target, torch.Tensor):
                continue  # a tensor the checker no longer holds: nothing to update
            value = self.decode(entry.get("value"), plain=True)
            grad = self.decode(entry.get("grad"), plain=True)
            if not isinstance(value, torch.Tensor) or not (grad is None or isinstance(grad, torch.Tensor)):
                raise Malformed("a malformed update")
            with torch.no_grad():
                if value.shape == target.shape and value.dtype == target.dtype:
                    if not torch.equal(value, target.detach()):
                        target.copy_(value)
                else:
                    target.data = value.detach()
            if target.is_leaf and isinstance(entry.get("rg"), bool) and target.requires_grad != entry["rg"] \
                    and (target.is_floating_point() or not entry["rg"]):
                target.requires_grad_(entry["rg"])
            target.grad = None if grad is None else grad.detach()
            self.sent[entry["cid"]] = (target._version, bool(target.requires_grad), id(target.grad),
                                       None if target.grad is None else target.grad._version)
        for entry in sync.get("modules", []):
            self._apply_module(entry)

    def _apply_module(self, entry) -> None:
        import torch

        if not isinstance(entry, dict) or not isinstance(entry.get("cid"), int):
            raise Malformed("a malformed update")
        module = self.objects.get(entry["cid"])
        if not isinstance(module, torch.nn.Module):
            raise Malformed("an update of an object the checker did not send")
        if isinstance(entry.get("training"), bool):
            module.training = entry["training"]
        attrs = self.decode(entry.get("attrs"), plain=True)
        tensors = self.decode(entry.get("tensors"), plain=True)
        kinds = entry.get("kinds")
        children = self.decode(entry.get("children"), plain=True)
        if not (isinstance(attrs, dict) and isinstance(tensors, dict) and isinstance(kinds, dict)
                and isinstance(children, dict)):
            raise Malformed("a malformed update")
        for key, value in attrs.items():
            # plain values (momentum, eps, ...) only: a handle set as an attribute (forward!) would make
            # the checker's own layer run the student's code
            if isinstance(key, str) and not key.startswith("_") and key != "training" and transport.is_plain(value) \
                    and key not in module._parameters and key not in module._buffers and key not in module._modules \
                    and not callable(getattr(type(module), key, None)):
                object.__setattr__(module, key, value)
        for holder, kind in ((module._parameters, "param"), (module._buffers, "buffer")):
            for key in [k for k in holder if kinds.get(k) != kind]:
                del holder[key]
        for key, value in tensors.items():
            kind = kinds.get(key)
            if not isinstance(key, str) or kind not in ("param", "buffer") \
                    or not (value is None or isinstance(value, torch.Tensor)):
                raise Malformed("a malformed update")
            holder = module._parameters if kind == "param" else module._buffers
            if holder.get(key, ...) is value:
                continue
            if kind == "param" and value is not None and not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
            holder[key] = value
        for key, child in children.items():
            if module._modules.get(key, ...) is child:
                continue
            if child is None or (isinstance(child, torch.nn.Module) and not isinstance(child, Remote)):
                module._modules[key] = child
            else:
                raise RuntimeError(f"your code replaced the layer {key!r} of a network the test passed to it by an "
                                   "object of its own: return a new network instead of changing the one given")


def _importable(fn) -> bool:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    target = module
    for part in getattr(fn, "__qualname__", "").split("."):
        target = getattr(target, part, None)
    return target is fn


# --- the namespace: the checker's own names first, the student's on demand ------------------

class Namespace(dict):
    """The test cells' globals: the instructor's names (setup, earlier test cells) live here; the
    answer names (what the solution cells define) and any other name not defined here are read
    from the student's process, once per cell."""

    def __init__(self, client: Client, answers) -> None:
        super().__init__()
        self._client, self._answers, self._cache, self._bound = client, frozenset(answers), {}, set()
        dict.__setitem__(self, "__builtins__", builtins)
        dict.__setitem__(self, "__name__", "__checker__")

    def new_cell(self) -> None:
        self._cache, self._bound = {}, set()

    def __setitem__(self, key, value):
        self._bound.add(key)  # bound by the test cell itself: its own, even if an answer has the name
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self._bound.discard(key)
        dict.__delitem__(self, key)

    def _student(self, key):
        if key in self._cache:
            return self._cache[key]
        answer = self._client.request("name", name=key)
        if type(answer) is not dict or type(answer.get("found")) is not bool:
            raise Malformed("a malformed answer to a name")
        if not answer["found"]:
            raise KeyError(key)
        self._cache[key] = answer.get("value")
        return self._cache[key]

    def __getitem__(self, key):
        if key in self._answers and key not in self._bound:
            return self._student(key)
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            pass
        if key in builtins.__dict__ or (key.startswith("__") and key.endswith("__")):
            raise KeyError(key)
        return self._student(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


# --- the test cells ---------------------------------------------------------------------------

class _Capture(io.TextIOBase):
    def __init__(self, sink: list) -> None:
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        self.sink.append(str(text))
        return len(text)


class _Forbid:
    """d2lite.forbid_calls in the checker: the student's functions called inside the block run with
    library normalization (and, if named, autograd) unavailable in their process."""

    def __init__(self, client: Client, names) -> None:
        from d2lite.checks import BATCH_NORM_LIBRARY_FUNCTIONS

        self.client, families = client, set()
        for name in names or BATCH_NORM_LIBRARY_FUNCTIONS:
            if any(key in str(name) for key in ("batch_norm", "layer_norm", "group_norm", "instance_norm")):
                # layer norm over a channel's values is batch norm: every library normalization is blocked
                families |= {"batch_norm", "layer_norm", "group_norm"}
            if str(name).startswith("torch.autograd"):
                families.add("autograd")
        self.families = families

    def __enter__(self):
        self.saved = self.client.block
        self.client.block = (self.saved or set()) | self.families
        return self

    def __exit__(self, *exc):
        self.client.block = self.saved
        return False


def _message(error: BaseException) -> str:
    if isinstance(error, Stopped):
        return str(error)
    if isinstance(error, Malformed):
        return f"the value your code returned could not be read: {error}"
    if isinstance(error, AssertionError):
        text = str(error) or "an assertion of this test failed"
    elif isinstance(error, StudentError):
        text = f"your code raised {error}"
    else:
        text = f"{type(error).__name__}: {error}"
    tb = getattr(error, "student_traceback", None)
    if tb:
        text += "\n(in your code: " + "; ".join(tb) + ")"
    return text[:8000]


def run_test(source: str, grade_id: str, hidden: list, ns: Namespace, client: Client) -> dict:
    """Run one test cell here; its verdict, message and the line that failed (hidden lines unquoted)."""
    import d2lite
    import d2lite.checks

    filename = f"<test {grade_id}>"
    code = compile(source, filename, "exec")
    ns.new_cell()
    output: list[str] = []
    saved = (sys.stdout, sys.stderr, d2lite.forbid_calls, d2lite.checks.forbid_calls, d2lite.checks.resident_mib,
             d2lite.checks.retained_memory, d2lite.checks.collect_garbage)
    forbid = lambda *names, namespace=None: _Forbid(client, names)  # noqa: E731
    d2lite.forbid_calls = d2lite.checks.forbid_calls = forbid
    # memory is measured where the student's functions run: the oracle's process, read from outside it
    d2lite.checks.resident_mib = lambda pid="self": saved[4](client.oracle_pid or "self")

    def retained_memory(*args, **kwargs):
        client.request("exact_memory")
        return saved[5](*args, **kwargs)
    d2lite.checks.retained_memory = retained_memory
    d2lite.checks.collect_garbage = lambda: None  # the checker's own garbage is not the measured memory
    sys.stdout, sys.stderr = _Capture(output), _Capture([])  # what the test prints; never the grader's warnings
    try:
        exec(code, ns)  # noqa: S102 — the instructor's test cell
    except BaseException as error:  # noqa: BLE001 — every failure is this test's verdict
        line = None
        for frame in traceback.extract_tb(error.__traceback__):
            if frame.filename == filename:
                line = frame.lineno
        lines = source.splitlines()
        in_hidden = line is not None and any(start <= line <= end for start, end in hidden)
        student_text = not isinstance(error, AssertionError) or hasattr(error, "student_traceback")
        if in_hidden and student_text:
            # the student's own text (an exception message) could carry the hidden inputs
            kind = str(error).split(":", 1)[0] if isinstance(error, StudentError) else type(error).__name__
            message = (str(error) if isinstance(error, (Stopped, Malformed)) else
                       f"your code raised {kind} in a hidden test")
            return {"ok": False, "ename": "Error", "message": message, "line": line, "hidden": True, "code": None,
                    "stdout": "".join(output)[:MAX_CELL_OUTPUT]}
        quoted = None if line is None or in_hidden or line > len(lines) else lines[line - 1].strip()[:300]
        return {"ok": False, "ename": type(error).__name__ if not isinstance(error, (Stopped, Malformed)) else "Error",
                "message": _message(error), "line": line, "hidden": in_hidden, "code": quoted,
                "stdout": "".join(output)[:MAX_CELL_OUTPUT]}
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        d2lite.forbid_calls, d2lite.checks.forbid_calls, d2lite.checks.resident_mib = saved[2], saved[3], saved[4]
        d2lite.checks.retained_memory = saved[5]
        d2lite.checks.collect_garbage = saved[6]
    return {"ok": True, "stdout": "".join(output)[:MAX_CELL_OUTPUT]}


def run(job: dict, client: Client, emit) -> None:
    _delegate_ranks(client)
    ns = Namespace(client, job.get("answers", []))
    try:
        client.request("files", files=job.get("files", {}))
    except Exception as error:  # noqa: BLE001
        emit({"t": "note", "text": f"the submission's files could not be written ({_message(error)})"})
    for cell in job["cells"]:
        index, role = cell["index"], cell["role"]
        emit({"t": "cell_start", "index": index})
        client.output = []
        end = {"t": "cell_end", "index": index, "role": role}
        if role in ("student", "both"):
            try:
                result = client.request("exec", source=cell["source"])
                if type(result) is not dict or type(result.get("ok")) is not bool:
                    raise Malformed("a malformed answer to a cell")
                end["ok"] = result["ok"]
                if not result["ok"]:
                    end["error"] = _student_error(result.get("error"))
            except Exception as error:  # noqa: BLE001
                end["ok"], end["error"] = False, {"ename": "Error", "evalue": _message(error), "traceback": []}
            end["stdout"] = "".join(client.output)[:MAX_CELL_OUTPUT]
        if role == "both":
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = _Capture([])
            try:
                exec(compile(cell["source"], f"<cell {index}>", "exec"), ns)  # noqa: S102 — the instructor's locked cell
            except BaseException as error:  # noqa: BLE001 — noted; the tests that need it will fail
                emit({"t": "note", "text": f"the instructor's cell {index} failed in the checker: "
                                           f"{type(error).__name__}: {str(error)[:300]}"})
            finally:
                sys.stdout, sys.stderr = saved
        if role == "test":
            verdict = run_test(cell["source"], cell["grade_id"], cell.get("hidden", []), ns, client)
            end.update(verdict)
            end["stdout"] = verdict.get("stdout", "")[:MAX_CELL_OUTPUT]
        emit(end)
    emit({"t": "done"})


def _delegate_ranks(client: Client) -> None:
    """d2lite's functions that run code on several processes (``d2lite.map_ranks`` …) run the
    student's functions there: in the checker they become calls of the student's process's own
    (whatever they return comes back by value, to be judged here). This checker serves one
    notebook, so its copy of d2lite is changed for that notebook alone."""
    import d2lite
    import d2lite.distributed

    def delegate(name):
        def run_in_student_process(*args, **kwargs):
            return client.request("library", name=name)(*args, **kwargs)
        run_in_student_process.__name__ = name
        return run_in_student_process

    for name in d2lite.distributed.STUDENT_SIDE:
        proxy = delegate(name)
        setattr(d2lite.distributed, name, proxy)
        if hasattr(d2lite, name):
            setattr(d2lite, name, proxy)


def _student_error(error) -> dict:
    try:
        exc = _exception(error)
    except Malformed:
        return {"ename": "Error", "evalue": "your cell raised an error", "traceback": []}
    kind = type(exc).__name__ if not isinstance(exc, StudentError) else str(exc).split(":", 1)[0]
    text = str(exc) if not isinstance(exc, StudentError) else str(exc).split(":", 1)[-1].strip()
    return {"ename": kind, "evalue": text, "traceback": list(getattr(exc, "student_traceback", []))}


def main() -> int:
    """The checker's entry point in the sandbox: the job on stdin, records on fd 3, the oracle on fds 4/5."""
    import torch

    job = json.loads(sys.stdin.read())
    sys.stdin = open(os.devnull)
    records = os.fdopen(3, "w", buffering=1)

    def emit(record: dict) -> None:
        records.write(json.dumps(record) + "\n")

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import matplotlib

    matplotlib.use("Agg")
    client = Client(transport.Channel(5, 4), time.monotonic() + float(job.get("wall", 300)))
    client.oracle_pid = job.get("oracle_pid") if isinstance(job.get("oracle_pid"), int) else None
    try:
        run(job, client, emit)
    finally:
        try:
            client.channel.send(b"P", pickle.dumps({"op": "exit"}))
        except OSError:
            pass
        records.flush()
    return 0
