"""checker.py and oracle.py, as two plain processes (pair.run_unsandboxed): the tests run in the
checker and judge values; the student's process answers with data and cannot decide a verdict."""
import json

import pytest

from d2lite.grading import pair

SETUP = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\nimport d2lite\n"
STUDENT = '''
import os, struct, json
from concurrent.futures import ThreadPoolExecutor

def double(x):
    return 2 * x

class Same:
    def __eq__(self, other):
        return True

def liar(x):
    return Same()

def layer_norm(X, eps=1e-5):
    mean = X.mean(dim=1, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=1, keepdim=True)
    return (X - mean) / torch.sqrt(var + eps)

def freeze(net):
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    net.momentum_note = "frozen"
    return net

def on_a_thread(X):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: F.batch_norm(X, None, None, training=True)).result()

stash = torch.autograd.grad

def grads_by_autograd(X):
    X = X.clone().requires_grad_(True)
    return stash((X ** 2).sum(), X)[0]

def apply(fn, items):
    return [fn(x) for x in items]

def fails(x):
    raise ValueError(f"secret input {x}")

def forge():
    body = json.dumps({"re": 10**6, "ok": True, "value": True}).encode()
    os.write(4, struct.pack(">I", len(body)) + b"J" + body)
    return 1

class Tensor:
    pass
Tensor.__module__ = "torch"

def fake_tensor():
    return Tensor()
'''
TESTS = {
    "values": "assert double(21) == 42\nassert double(torch.ones(2)).tolist() == [2.0, 2.0]",
    "wrong_value": "assert double(2) == 5, 'expected 5'",
    "always_equal": "assert liar(1) == [1, 2, 3], 'a list'",
    "gradients": ("X = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)\n"
                  "Y = layer_norm(X)\nassert Y.requires_grad and Y.grad_fn is not None\n"
                  "dY = torch.randn(4, 3, dtype=torch.float64)\n"
                  "g, = torch.autograd.grad(Y, X, dY)\n"
                  "expected, = torch.autograd.grad(F.layer_norm(X, (3,)), X, dY)\n"
                  "d2lite.assert_close(g, expected, 'the gradient', rtol=1e-6, atol=1e-8)"),
    "mutation": ("net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))\nout = freeze(net)\n"
                 "assert out is net and not net.training and not net[1].training\n"
                 "assert not any(p.requires_grad for p in net.parameters())\nassert net.momentum_note == 'frozen'"),
    "block_on_thread": "with d2lite.forbid_calls():\n    on_a_thread(torch.randn(4, 3))",
    "no_block_outside": "assert on_a_thread(torch.randn(4, 3)).shape == (4, 3)",
    "stashed_autograd": ("with d2lite.forbid_calls('torch.autograd.grad'):\n"
                         "    grads_by_autograd(torch.randn(3))"),
    "callbacks": ("assert apply(lambda v: v + 1, [1, 2]) == [2, 3]\n"
                  "assert apply(lambda v: v, (i * i for i in range(3))) == [[0, 1, 4]] or True\n"
                  "gen = (i for i in range(3))\nassert apply(str, gen) == ['0', '1', '2']"),
    "hidden_message": "x = 1\n### BEGIN HIDDEN TESTS\nfails(12345)\n### END HIDDEN TESTS",
    "visible_message": "fails(777)",
    "own_name": "double = 'mine'\nassert double == 'mine'",
    "fake_tensor": "t = fake_tensor()\nassert not isinstance(t, torch.Tensor)\ntorch.as_tensor(t)",
    "forged_frame": "forge()",
    "after_the_forgery": "assert double(1) == 2",
}


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    cells = [{"index": 0, "role": "both", "source": SETUP}, {"index": 1, "role": "student", "source": STUDENT}]
    for i, (name, source) in enumerate(TESTS.items(), start=2):
        hidden = [(2, 4)] if "HIDDEN" in source else []
        cells.append({"index": i, "role": "test", "source": source, "grade_id": name, "hidden": hidden})
    job = {"cells": cells, "answers": ["double", "liar", "layer_norm", "freeze", "on_a_thread", "grads_by_autograd",
                                       "apply", "fails", "forge", "fake_tensor"], "files": {}, "wall": 120}
    records, output = pair.run_unsandboxed(job, str(tmp_path_factory.mktemp("home")))
    out = {}
    for line in records.decode().splitlines():
        record = json.loads(line)
        if record["t"] == "cell_end" and record.get("role") == "test":
            out[record["grade_id"] if "grade_id" in record else list(TESTS)[record["index"] - 2]] = record
    assert len(out) == len(TESTS), output.decode()[-3000:]
    return out


@pytest.mark.parametrize("name, passes", [
    ("values", True), ("wrong_value", False), ("always_equal", False), ("gradients", True), ("mutation", True),
    ("block_on_thread", False), ("no_block_outside", True), ("stashed_autograd", False), ("callbacks", True),
    ("own_name", True), ("forged_frame", False), ("after_the_forgery", False)])
def test_each_check_is_decided_in_the_checker(ends, name, passes):
    assert ends[name]["ok"] is passes, ends[name]


def test_the_block_and_the_forgery_say_why(ends):
    assert "library normalization" in ends["block_on_thread"]["message"]
    assert "autograd is unavailable" in ends["stashed_autograd"]["message"]
    assert "protocol" in ends["forged_frame"]["message"] and "protocol" in ends["after_the_forgery"]["message"]


def test_a_hidden_failure_shows_neither_its_code_nor_the_students_text(ends):
    hidden, visible = ends["hidden_message"], ends["visible_message"]
    assert hidden["hidden"] and hidden["code"] is None and "12345" not in hidden["message"]
    assert "ValueError" in hidden["message"]
    assert "777" in visible["message"] and visible["code"] == "fails(777)"


def test_a_handle_cannot_pass_for_a_tensor(ends):
    assert ends["fake_tensor"]["ok"] is False  # as_tensor refuses it; the checker does not crash
    assert ends["after_the_forgery"]  # and the checker went on to the next cells


RANKS_STUDENT = '''
import torch.distributed as dist

def global_mean(X):
    total = torch.stack([torch.tensor(float(len(X)), dtype=X.dtype), X.sum()])
    dist.all_reduce(total)
    return total[1] / total[0]

def local_mean(X):
    return X.mean()

def by_library(X):
    return F.batch_norm(X, None, None, training=True)
'''
RANKS_TESTS = {
    "ranks_values": ("X = torch.randn(10, dtype=torch.float64)\nexpected = X.mean()\n"
                     "got = d2lite.map_ranks(global_mean, X.split([3, 7]))\n"
                     "assert all(abs(g - expected) < 1e-12 for g in got), (got, expected)"),
    "ranks_local": ("X = torch.randn(10, dtype=torch.float64) + torch.arange(10)\nexpected = X.mean()\n"
                    "got = d2lite.map_ranks(local_mean, X.split([3, 7]))\n"
                    "assert all(abs(g - expected) < 1e-12 for g in got), (got, expected)"),
    "ranks_blocked": ("with d2lite.forbid_calls():\n"
                      "    d2lite.map_ranks(by_library, torch.randn(8, 3).split([4, 4]))"),
    "ranks_grads": ("X = torch.randn(6, 3, dtype=torch.float64)\n"
                    "out = d2lite.grad_on_ranks(by_library, X.split([3, 3]), torch.ones(6, 3).split([3, 3]))\n"
                    "assert len(out) == 2 and out[0][1].shape == (3, 3)"),
}


def test_functions_on_several_processes_run_in_the_students_process_and_are_judged_here(tmp_path):
    cells = [{"index": 0, "role": "both", "source": SETUP},
             {"index": 1, "role": "student", "source": RANKS_STUDENT}]
    for i, (name, source) in enumerate(RANKS_TESTS.items(), start=2):
        cells.append({"index": i, "role": "test", "source": source, "grade_id": name, "hidden": []})
    job = {"cells": cells, "answers": ["global_mean", "local_mean", "by_library"], "files": {}, "wall": 120}
    records, output = pair.run_unsandboxed(job, str(tmp_path))
    ends = {}
    for line in records.decode().splitlines():
        record = json.loads(line)
        if record["t"] == "cell_end" and record.get("role") == "test":
            ends[list(RANKS_TESTS)[record["index"] - 2]] = record
    assert {name: end["ok"] for name, end in ends.items()} == {
        "ranks_values": True, "ranks_local": False, "ranks_blocked": False, "ranks_grads": True}, \
        (ends, output.decode()[-3000:])
    assert "library normalization" in ends["ranks_blocked"]["message"]
