"""transport.py: plain data round-trips exactly; anything else the student's process could send is
refused with a reason (Malformed), never an internal error."""
import json
import math

import pytest
import torch

from d2lite.grading import transport
from d2lite.grading.transport import Malformed


def _round_trip(value):
    handles = []

    def handle(obj):
        handles.append(obj)
        return {"h": {"id": len(handles) - 1, "m": type(obj).__module__, "q": type(obj).__qualname__}}

    data = json.loads(json.dumps(transport.encode_value(value, handle, lambda obj: None)))
    return _decode(data), handles


def _decode(data, refs=None):
    return transport.decode_value(data, tensor=lambda spec, t: t, handle=lambda record: ("handle", record),
                                  ref=lambda cid: (refs or {})[cid])


def test_plain_data_round_trips_exactly():
    value = {"a": [1, 2.5, None, True, "text"], (1, 2): frozenset({3}), "s": {4, 5},
             "f": [float("nan"), float("inf"), -float("inf")], "b": b"\x00\x01"}
    back, handles = _round_trip(value)
    assert handles == []
    assert back["a"] == [1, 2.5, None, True, "text"] and back[(1, 2)] == frozenset({3}) and back["s"] == {4, 5}
    assert math.isnan(back["f"][0]) and back["f"][1:] == [float("inf"), -float("inf")] and back["b"] == b"\x00\x01"
    assert type(back["a"]) is list and type(back[(1, 2)]) is frozenset


@pytest.mark.parametrize("t", [torch.randn(3, 4, dtype=torch.float64), torch.tensor(2.5), torch.zeros(0, 2),
                               torch.arange(5), torch.randn(2, 3).to(torch.bfloat16), torch.tensor([True, False])])
def test_tensors_travel_as_dtype_shape_and_bytes(t):
    back, _ = _round_trip(t)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_what_is_not_data_stays_behind_as_a_handle():
    layer = torch.nn.Linear(2, 2)
    back, handles = _round_trip([layer, lambda: 1])
    assert [b[0] for b in back] == ["handle", "handle"] and handles[0] is layer
    assert back[0][1]["q"] == "Linear" and back[0][1]["m"] == "torch.nn.modules.linear"


def test_a_graph_carrying_tensor_reports_its_own_fields_not_its_properties():
    class Liar(torch.Tensor):
        @property
        def requires_grad(self):
            return False

        @property
        def grad_fn(self):
            return None

    X = torch.randn(3, requires_grad=True)
    record = transport.tensor_record((X * 2).as_subclass(Liar))
    assert record["rg"] is True and record["gf"] is True


def test_nesting_deeper_than_the_cap_is_sent_as_a_handle():
    deep = []
    for _ in range(transport.MAX_DEPTH + 10):
        deep = [deep]
    back, handles = _round_trip(deep)
    assert handles  # the levels below the cap stayed behind


@pytest.mark.parametrize("data, words", [
    ({"T": {"dtype": "float64", "shape": [4], "data": "AAAA"}}, "bytes of data"),
    ({"T": {"dtype": "object", "shape": [1], "data": ""}}, "unknown dtype"),
    ({"T": {"dtype": "float64", "shape": [-1], "data": ""}}, "shape"),
    ({"T": {"dtype": "float64", "shape": [1 << 40], "data": ""}}, "shape"),
    ({"T": {"dtype": "float64", "shape": [1], "data": "!!!"}}, "base64"),
    ({"T": {"dtype": "float64", "shape": [1], "data": "AAAAAAAAAAA=", "rg": "yes"}}, "flag"),
    ({"x": 1}, "unknown tag"),
    ({"l": [1], "t": [2]}, "unexpected dict"),
    ({"l": 5}, "not a list"),
    ({"d": [[1]]}, "pairs"),
    ({"f": "1e400"}, "malformed float"),
    ({"c": 7}, "did not send"),
    ({"h": {"id": -1}}, "malformed handle"),
    ({"s": [{"l": []}]}, "unhashable"),
    ([1, 2], "unexpected list"),
])
def test_malformed_values_are_refused_with_a_reason(data, words):
    def ref(cid):
        raise Malformed("a reference to an object the checker did not send")
    with pytest.raises(Malformed, match=words):
        transport.decode_value(data, tensor=lambda s, t: t, handle=lambda r: r, ref=ref)


def test_caps_on_depth_entries_and_elements():
    deep = {"l": []}
    for _ in range(transport.MAX_DEPTH + 5):
        deep = {"l": [deep]}
    with pytest.raises(Malformed, match="nested"):
        _decode(deep)
    with pytest.raises(Malformed, match="too large"):
        _decode({"l": [1] * (transport.MAX_ITEMS + 1)})
    with pytest.raises(Malformed):
        transport.decode_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(Malformed, match="not allowed"):
        transport.decode_json(b'{"re": NaN}')


def test_frames_over_the_cap_are_refused(tmp_path):
    import os
    import struct

    r, w = os.pipe()
    os.write(w, struct.pack(">I", transport.MAX_FRAME + 1) + b"J")
    with pytest.raises(Malformed, match="cap"):
        transport.Channel(r, w).recv(deadline=None)
    os.close(r)
    os.close(w)


def test_a_closed_or_silent_channel_ends_the_wait(tmp_path):
    import os
    import time

    r, w = os.pipe()
    channel = transport.Channel(r, w)
    with pytest.raises(TimeoutError):
        channel.recv(deadline=time.monotonic() + 0.1)
    os.close(w)
    with pytest.raises(EOFError):
        transport.Channel(r, os.open(os.devnull, os.O_WRONLY)).recv(deadline=None)
    os.close(r)


def test_modules_are_walked_in_one_order_and_handles_are_skipped():
    inner = torch.nn.Linear(2, 2)
    net = torch.nn.Sequential(inner, torch.nn.ReLU(), inner)
    found = transport.modules_in(({"net": net}, [inner], 3))
    assert found == [net, inner, net[1]]
    assert transport.modules_in((net,), skip=frozenset({id(net)})) == []
