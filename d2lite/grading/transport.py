"""What crosses between the student's process and the checker: frames, plain data, and handles.

Each message is one frame: 4 bytes of length (big-endian), one byte of kind, the payload. The
checker sends ``P`` frames (pickle: it is the trusted side, and the student's process may read
whatever it likes of what the checker sends). The student's process sends ``J`` frames (JSON), and
the checker reads them only with :func:`decode_value`, a strict decoder with caps on size, depth
and element count: a value it rejects fails that one check with a reason (:class:`Malformed`).

Values from the student's process are plain data: None, bool, int, float, str, tensors (dtype,
shape, raw bytes), and lists/tuples/dicts/sets of them. Everything else stays in the student's
process and travels as a handle (an id, plus the name of its type); an object the checker sent
comes back as a reference to the checker's own object.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
from typing import Any, Callable

__all__ = ["Malformed", "Channel", "encode_value", "decode_value", "MAX_FRAME", "MAX_DEPTH", "MAX_ITEMS",
           "MAX_ELEMENTS", "MAX_TEXT", "DTYPES"]

MAX_FRAME = 96 << 20        # bytes of one frame (either direction)
MAX_DEPTH = 24              # nesting of lists/tuples/dicts in one value
MAX_ITEMS = 200_000         # list/tuple/dict/set entries in one value, all levels together
MAX_ELEMENTS = 8 << 20      # tensor elements in one value, all tensors together
MAX_TEXT = 200_000          # characters of one string
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
          "complex64", "complex128")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.<>]{0,200}")
_TAGS = {"l", "t", "d", "s", "fs", "f", "T", "h", "c", "it", "b"}


class Malformed(ValueError):
    """A value from the student's process that the decoder refuses (the reason is in the message)."""


class Channel:
    """Frames over a pair of pipe ends. ``recv`` waits at most until ``deadline`` (time.monotonic())."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def send(self, kind: bytes, payload: bytes) -> None:
        if len(payload) > MAX_FRAME:
            raise Malformed(f"a message of {len(payload)} bytes is over the {MAX_FRAME >> 20} MiB cap")
        data = struct.pack(">I", len(payload)) + kind + payload
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def _read(self, n: int, deadline: float | None) -> bytes:
        import select
        import time

        chunks, need = [], n
        while need:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                    raise TimeoutError("no answer in time")
            chunk = os.read(self.rfd, min(need, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the channel")
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)

    def recv(self, deadline: float | None = None) -> tuple[bytes, bytes]:
        (length,) = struct.unpack(">I", self._read(4, deadline))
        if length > MAX_FRAME:
            raise Malformed(f"a message of {length} bytes is over the {MAX_FRAME >> 20} MiB cap")
        kind = self._read(1, deadline)
        return kind, self._read(length, deadline)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


# --- the student's side: any value -> JSON-able data -----------------------------------------

def encode_value(value: Any, handle: Callable[[Any], dict], ref: Callable[[Any], int | None]) -> Any:
    """``value`` as plain data. ``ref(obj)`` gives the checker's id of an object it sent (or None);
    ``handle(obj)`` registers an object that stays here and returns its handle record."""
    import types

    import torch

    def enc(v, depth):
        if depth > MAX_DEPTH:
            return handle(v)
        if v is None or isinstance(v, (bool, str)):
            return v if not isinstance(v, str) else str(v)[:MAX_TEXT]
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            v = float(v)
            return v if math.isfinite(v) else {"f": repr(v)}
        cid = ref(v)
        if cid is not None:
            return {"c": cid}
        if isinstance(v, torch.Tensor):
            return {"T": tensor_record(v, handle)}
        if isinstance(v, bytes):
            return {"b": base64.b64encode(v[:MAX_TEXT]).decode()}
        for kind, tag in ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "fs")):
            if isinstance(v, kind):  # subclasses too (torch.Size, namedtuples): as plain data
                return {tag: [enc(x, depth + 1) for x in v]}
        if isinstance(v, dict):  # OrderedDict (a state_dict) and other dicts: as plain data
            return {"d": [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]}
        if isinstance(v, (types.GeneratorType, map, filter, zip, enumerate, reversed)) or type(v).__name__ in (
                "dict_keys", "dict_values", "dict_items", "odict_keys", "odict_values", "odict_items"):
            items = []
            for i, x in enumerate(v):
                if i >= 100_000:
                    break
                items.append(enc(x, depth + 1))
            return {"it": items}
        return handle(v)

    return enc(value, 0)


def tensor_record(t, handle=None) -> dict:
    import torch

    base = torch._C.TensorBase  # the tensor's own fields, not what a subclass's properties say
    requires_grad, grad_fn = base.requires_grad.__get__(t), base.grad_fn.__get__(t)
    with torch._C.DisableTorchFunctionSubclass():
        plain = base.detach(t).cpu()
    if type(plain) is not torch.Tensor:
        plain = plain.as_subclass(torch.Tensor)
    dtype = str(plain.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TypeError(f"a tensor of dtype {dtype} cannot be returned")
    flat = plain.reshape(-1).contiguous()
    raw = (flat.view(torch.uint8) if dtype == "bfloat16" else flat).numpy().tobytes()
    record = {"dtype": dtype, "shape": list(plain.shape), "data": base64.b64encode(raw).decode(),
              "rg": bool(requires_grad), "gf": grad_fn is not None,
              "param": isinstance(t, torch.nn.Parameter)}
    if handle is not None and (requires_grad or grad_fn is not None):
        record["h"] = handle(t)["h"]["id"]
    return record


# --- the checker's side: the strict decoder --------------------------------------------------

def decode_json(payload: bytes) -> Any:
    """JSON with no surprises: the standard parser, NaN/Infinity refused (floats travel tagged)."""
    def no_constants(name):
        raise Malformed(f"{name} is not allowed in a value")
    try:
        return json.loads(payload, parse_constant=no_constants)
    except (ValueError, RecursionError) as error:
        raise Malformed(f"not readable as data ({type(error).__name__}: {str(error)[:200]})") from None


def decode_value(data: Any, *, tensor: Callable[[dict, Any], Any], handle: Callable[[dict], Any],
                 ref: Callable[[int], Any]) -> Any:
    """The checker's reading of a value from the student's process. ``tensor(spec, plain)``,
    ``handle(record)`` and ``ref(cid)`` build what the records name; anything outside the
    format, over a cap or inconsistent raises :class:`Malformed`."""
    import torch

    budget = {"items": MAX_ITEMS, "elements": MAX_ELEMENTS}

    def spend(key, n):
        budget[key] -= n
        if budget[key] < 0:
            raise Malformed(f"the value is too large (over {MAX_ITEMS} entries or {MAX_ELEMENTS} tensor elements)")

    def dec(v, depth):
        if depth > MAX_DEPTH + 1:
            raise Malformed(f"the value is nested more than {MAX_DEPTH} levels deep")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            if abs(v) > 1 << 4096:
                raise Malformed("an integer is too large")
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise Malformed("a string is too long")
            return v
        if not isinstance(v, dict) or len(v) != 1:
            raise Malformed(f"unexpected {type(v).__name__} in a value")
        (tag, body), = v.items()
        if tag not in _TAGS:
            raise Malformed(f"unknown tag {str(tag)[:20]!r}")
        if tag in ("l", "t", "s", "fs", "it"):
            if not isinstance(body, list):
                raise Malformed("a sequence that is not a list")
            spend("items", len(body))
            items = [dec(x, depth + 1) for x in body]
            if tag == "l":
                return items
            if tag == "t":
                return tuple(items)
            if tag == "it":
                return iter(items)
            try:
                return set(items) if tag == "s" else frozenset(items)
            except TypeError as error:
                raise Malformed(f"a set of unhashable values ({error})") from None
        if tag == "d":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                raise Malformed("a dict that is not a list of pairs")
            spend("items", len(body))
            out = {}
            for k, x in body:
                key = dec(k, depth + 1)
                try:
                    out[key] = dec(x, depth + 1)
                except TypeError as error:
                    raise Malformed(f"a dict with an unhashable key ({error})") from None
            return out
        if tag == "f":
            if body not in ("nan", "inf", "-inf"):
                raise Malformed("a malformed float")
            return float(body)
        if tag == "b":
            if not isinstance(body, str):
                raise Malformed("malformed bytes")
            try:
                return base64.b64decode(body, validate=True)
            except ValueError:
                raise Malformed("malformed bytes") from None
        if tag == "c":
            if not isinstance(body, int) or isinstance(body, bool):
                raise Malformed("a malformed reference")
            return ref(body)
        if tag == "h":
            return handle(handle_record(body))
        if tag == "T":
            spec = _tensor_spec(body)
            spend("elements", spec["numel"])
            return tensor(spec, _tensor_from_spec(spec, torch))
        raise Malformed(f"unknown tag {tag!r}")

    return dec(data, 0)


def handle_record(body: Any) -> dict:
    """A handle's record: {"id": int, "m": its type's module, "q": its type's qualified name}."""
    if not isinstance(body, dict):
        raise Malformed("a malformed handle")
    hid = body.get("id")
    if not isinstance(hid, int) or isinstance(hid, bool) or hid < 0:
        raise Malformed("a malformed handle")
    out = {"id": hid}
    for key in ("m", "q"):
        name = body.get(key, "object")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            name = "object"
        out[key] = name
    return out


def _tensor_spec(body: Any) -> dict:
    if not isinstance(body, dict):
        raise Malformed("a malformed tensor")
    dtype, shape, data = body.get("dtype"), body.get("shape"), body.get("data")
    if dtype not in DTYPES:
        raise Malformed(f"a tensor of unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ELEMENTS for s in shape):
        raise Malformed("a tensor with a malformed shape")
    if not isinstance(data, str):
        raise Malformed("a tensor without data")
    numel = 1
    for s in shape:
        numel *= s
        if numel > MAX_ELEMENTS:
            raise Malformed("a tensor with too many elements")
    flags = {}
    for key in ("rg", "gf", "param"):
        flag = body.get(key, False)
        if not isinstance(flag, bool):
            raise Malformed("a tensor with a malformed flag")
        flags[key] = flag
    hid = body.get("h")
    if hid is not None and (not isinstance(hid, int) or isinstance(hid, bool) or hid < 0):
        raise Malformed("a tensor with a malformed handle")
    return {"dtype": dtype, "shape": shape, "data": data, "numel": numel, "h": hid, **flags}


def _tensor_from_spec(spec: dict, torch) -> Any:
    try:
        raw = base64.b64decode(spec["data"], validate=True)
    except ValueError:
        raise Malformed("a tensor whose data is not base64") from None
    torch_dtype = getattr(torch, spec["dtype"])
    size = torch.empty((), dtype=torch_dtype).element_size()
    if len(raw) != spec["numel"] * size:
        raise Malformed(f"a tensor of shape {tuple(spec['shape'])} with {len(raw)} bytes of data")
    if spec["numel"] == 0:
        return torch.empty(spec["shape"], dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(spec["shape"]).clone()


def is_plain(value, depth: int = 0) -> bool:
    """A module attribute that may travel back as a plain value (momentum, eps, a shape): None, bool,
    int, float, str, and small tuples/lists of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return type(value) in (tuple, list) and depth < 3 and len(value) < 64 and all(is_plain(v, depth + 1) for v in value)


def modules_in(objects: Any, limit: int = 20_000, skip: frozenset = frozenset()) -> list:
    """Every nn.Module in ``objects`` (lists, tuples and dict values, at any depth), each once, in one
    fixed order; the checker and the student's process walk the same objects the same way, so the
    i-th module here is the i-th module there."""
    import torch

    out, seen = [], set()

    def walk(v, depth):
        if depth > MAX_DEPTH or len(out) >= limit or id(v) in skip:
            return
        if issubclass(type(v), torch.nn.Module):  # type(): a handle's claimed class does not count
            for m in v.modules():
                if id(m) not in seen and len(out) < limit:
                    seen.add(id(m))
                    out.append(m)
        elif type(v) in (list, tuple):
            for x in v:
                walk(x, depth + 1)
        elif type(v) is dict:
            for x in v.values():
                walk(x, depth + 1)

    walk(objects, 0)
    return out
