"""The oracle's _Library: what d2lite.map_ranks (…) run on in the student's process is put back as
it was before student code ran, each time the checker calls one (no sandbox needed)."""
import io
import multiprocessing.connection as connection
import pickle

import torch
import torch.serialization

import d2lite.distributed as distributed
from d2lite.grading.oracle import _Library


def test_patches_of_the_path_the_ranks_results_take_are_put_back():
    load, inner, recv, loads = torch.load, torch.serialization._load, connection.Connection.recv_bytes, pickle.loads
    map_ranks, collect_code = distributed.map_ranks, distributed._collect.__code__
    library = _Library()
    try:
        torch.load = lambda *a, **k: "forged"                         # torch.nn.functional.torch.load = …
        torch.serialization._load = lambda *a, **k: "forged"
        torch.serialization.isinstance = lambda *a: True             # a global shadowing a builtin
        connection._ConnectionBase.recv_bytes = lambda self: b"forged"
        connection.Connection.recv_bytes = lambda self: b"forged"   # shadows the base class's
        pickle.loads = lambda *a, **k: "forged"
        distributed.map_ranks = lambda *a, **k: "forged"
        distributed._collect.__code__ = (lambda *a: "forged").__code__
        distributed._extra = "added"
        assert library.get("map_ranks") is map_ranks
        assert torch.load is load and torch.serialization._load is inner and pickle.loads is loads
        assert "isinstance" not in vars(torch.serialization)
        assert connection.Connection.recv_bytes is recv and "recv_bytes" not in vars(connection.Connection)
        assert distributed.map_ranks is map_ranks and distributed._collect.__code__ is collect_code
        assert not hasattr(distributed, "_extra")
        buffer = io.BytesIO()
        torch.save([1, torch.ones(2)], buffer)
        assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)[0] == 1
    finally:
        torch.load, torch.serialization._load, pickle.loads = load, inner, loads
        vars(torch.serialization).pop("isinstance", None)
        for cls in (connection.Connection, connection._ConnectionBase):
            if vars(cls).get("recv_bytes") is not recv and cls is connection.Connection:
                vars(cls).get("recv_bytes") and delattr(cls, "recv_bytes")
        connection._ConnectionBase.recv_bytes = recv
        distributed.map_ranks, distributed._collect.__code__ = map_ranks, collect_code
        distributed._forget_in_rank = None
        vars(distributed).pop("_extra", None)


def test_only_the_functions_that_run_ranks_are_handed_out():
    import pytest

    library = _Library()
    with pytest.raises(ValueError, match="not a d2lite function"):
        library.get("train_distributed")
    distributed._forget_in_rank = None
