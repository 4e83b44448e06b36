"""What a test cell records in the sandbox (data only) and how the grader reads it back.

The trusted grader rewrites each test cell before it runs: ``d2lite.assert_close(actual, expected,
...)`` becomes ``__d2lite_probe__.close(site, actual, expected, ...)``, ``assert test, msg`` becomes
``__d2lite_probe__.check(site, test) or __d2lite_probe__.fail(site, msg)``, and ``with
d2lite.forbid_calls(...)`` also traces the ATen ops dispatched inside. The probe still raises where
the original check raised (the cell's control flow is unchanged) and writes one JSON line per check
to the records pipe. Tensors travel as dtype, shape and raw bytes (base64): nothing in a record can
run code when it is read.
"""
from __future__ import annotations

import ast
import base64
import json
from typing import Any, Iterator

__all__ = ["PROBE", "instrument", "encode", "decode", "read_records", "Probe"]

PROBE = "__d2lite_probe__"
MAX_ELEMENTS = 1 << 20
MAX_TEXT = 4000
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128")


def _site(node: ast.AST) -> str:
    return f"{node.lineno}:{node.col_offset}"


def _is_call_to(node: ast.AST, names: tuple[str, ...]) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) in names


class _Instrument(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        self.generic_visit(node)
        probe = ast.Name(PROBE, ast.Load())
        check = ast.Call(ast.Attribute(probe, "check", ast.Load()),
                         [ast.Constant(_site(node)), node.test], [])
        fail = ast.Call(ast.Attribute(probe, "fail", ast.Load()),
                        [ast.Constant(_site(node)), node.msg or ast.Constant(None)], [])
        return ast.copy_location(ast.Expr(ast.BoolOp(ast.Or(), [check, fail])), node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if _is_call_to(node, ("d2lite.assert_close", "d2lite.checks.assert_close", "assert_close")):
            func = ast.Attribute(ast.Name(PROBE, ast.Load()), "close", ast.Load())
            return ast.copy_location(ast.Call(func, [ast.Constant(_site(node))] + node.args, node.keywords), node)
        return node

    def visit_With(self, node: ast.With) -> ast.AST:
        self.generic_visit(node)
        for item in node.items:
            expr = item.context_expr
            if _is_call_to(expr, ("d2lite.forbid_calls", "d2lite.checks.forbid_calls", "forbid_calls")):
                func = ast.Attribute(ast.Name(PROBE, ast.Load()), "forbid", ast.Load())
                item.context_expr = ast.copy_location(
                    ast.Call(func, [ast.Constant(_site(expr))] + expr.args, expr.keywords), expr)
        return node


def instrument(source: str) -> str:
    """A test cell's source with its checks turned into probes (the instructor's source, trusted)."""
    tree = _Instrument().visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


def encode(value: Any) -> Any:
    """A JSON-able copy of a checked value: tensors as dtype/shape/base64 bytes, others as themselves."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, str) else value[:MAX_TEXT]
    if type(value) is torch.nn.Parameter:
        value = value.detach()  # a plain tensor with the parameter's values
    if type(value) is not torch.Tensor:
        try:
            value = torch.as_tensor(value)
        except Exception as error:  # noqa: BLE001 — any value the test compares
            return {"unencodable": f"{type(value).__name__}: {error}"[:MAX_TEXT]}
        if type(value) is not torch.Tensor:
            return {"unencodable": type(value).__name__}
    t = value.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES or t.numel() > MAX_ELEMENTS:
        return {"unencodable": f"a tensor of dtype {dtype} with {t.numel()} elements"}
    flat = t.reshape(-1).contiguous()
    raw = (flat.view(torch.uint8) if dtype == "bfloat16" else flat).numpy().tobytes()  # numpy has no bfloat16
    return {"tensor": {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}}


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`, for records read from the sandbox (validated, data only)."""
    import torch

    if isinstance(value, dict) and set(value) == {"tensor"}:
        spec = value["tensor"]
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in _DTYPES or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError("malformed tensor record")
        raw = base64.b64decode(spec.get("data", ""), validate=True)
        torch_dtype = getattr(torch, dtype)
        numel = 1
        for s in shape:
            numel *= s
        if numel > MAX_ELEMENTS or len(raw) != numel * torch.empty((), dtype=torch_dtype).element_size():
            raise ValueError("tensor record of the wrong size")
        if numel == 0:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape).clone()
    return value


def read_records(data: bytes) -> Iterator[dict]:
    """The records of one sandbox run, one JSON object a line; a malformed line ends the stream."""
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            yield {"t": "corrupt"}
            return
        if not isinstance(record, dict):
            yield {"t": "corrupt"}
            return
        yield record


class Probe:
    """The recorder that the instrumented test cells call, inside the sandbox."""

    def __init__(self, emit, namespace: dict) -> None:
        self._emit, self._namespace = emit, namespace

    def close(self, site, actual, expected, what="the result", *, rtol=None, atol=None, hint=None):
        from d2lite.checks import assert_close

        self._emit({"t": "close", "site": site, "actual": encode(actual), "expected": encode(expected),
                    "what": str(what)[:MAX_TEXT], "rtol": rtol, "atol": atol,
                    "hint": None if hint is None else str(hint)[:MAX_TEXT]})
        assert_close(actual, expected, what, rtol=rtol, atol=atol, hint=hint)

    def check(self, site, test) -> bool:
        ok = bool(test)
        self._emit({"t": "assert", "site": site, "ok": ok})
        return ok

    def fail(self, site, msg):
        text = None if msg is None else str(msg)[:MAX_TEXT]
        self._emit({"t": "assert_msg", "site": site, "msg": text})
        raise AssertionError(msg) if msg is not None else AssertionError()

    def forbid(self, site, *names, namespace=None):
        return _Forbid(self, site, names, self._namespace if namespace is None else namespace)


class _Forbid:
    def __init__(self, probe: Probe, site: str, names, namespace) -> None:
        self.probe, self.site, self.names, self.namespace = probe, site, names, namespace

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from d2lite.checks import forbid_calls

        ops: set[str] = set()

        class Trace(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.add(str(func.overloadpacket.__name__))
                return func(*args, **(kwargs or {}))

        self.ops = ops
        self.calls = forbid_calls(*self.names, namespace=self.namespace)
        self.calls.__enter__()
        self.trace = Trace()
        self.trace.__enter__()
        return self

    def __exit__(self, *exc):
        self.trace.__exit__(*exc)
        self.probe._emit({"t": "trace", "site": self.site, "ops": sorted(self.ops)})
        return self.calls.__exit__(*exc)
