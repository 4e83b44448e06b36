"""policy.py: the source policy reads the code as IPython will run it; what it cannot parse is
flagged with the line; honest code (magics that measure, prints, imports of allowed modules) is not."""
import pytest

from d2lite.grading.policy import check_cell, transform

PATCH = "d2lite.assert_close = lambda *a, **k: None"


@pytest.mark.parametrize("source", [
    f"%time 1\n{PATCH}\n",                                   # a line magic at the top
    "".join("    " + line + "\n" for line in ["x = 1", PATCH]),  # the whole cell indented
    "".join(">>> " + line + "\n" for line in ["x = 1", PATCH]),  # doctest prompts
    f"{PATCH}\n",
])
def test_a_patch_is_flagged_however_the_cell_hides_it(source):
    flags = check_cell(source, "batch_norm_impl")
    assert any(f.kind == "machinery" and "d2lite.assert_close" in f.code for f in flags), flags


def test_the_transforms_are_ipythons():
    assert transform(">>> x = 1\n>>> y = 2\n").splitlines() == ["x = 1", "y = 2"]
    assert transform("    a = 1\n    b = 2\n").splitlines() == ["a = 1", "b = 2"]
    assert "run_line_magic('time'" in transform("%time 1\n")


def test_code_that_cannot_be_parsed_is_flagged_with_its_line_never_skipped():
    flags = check_cell("x = 1\ndef f(:\n    pass\n", "mine")
    assert [(f.kind, f.line) for f in flags] == [("syntax", 2)]
    assert "def f(:" in str(flags[0])


@pytest.mark.parametrize("source", [
    "%time y = 1 + 1\n", "%%timeit\nsum(range(10))\n", "%matplotlib inline\n",
    "import math, itertools, collections\nprint(math.pi)\n", "import warnings\nwarnings.warn('w')\n",
    "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(2, 2)\n",
    "print(type(x).__name__)\n",
])
def test_honest_code_is_not_flagged(source):
    assert check_cell(source, "mine") == []


@pytest.mark.parametrize("source, words", [
    ("import sys\n", "imports sys"),
    ("import d2lite.grading.oracle as O\n", "d2lite.grading"),
    ("torch.sys.modules['x'] = 1\n", "patch"),
    ("getattr(d2lite, 'assert_close')\n", "getattr"),
    ("f = globals()\n", "globals"),
    ("x.__code__ = y\n", "__code__"),
    ("get_ipython().run_line_magic('run', 'evil.py')\n", "get_ipython"),
    ("torch.ops.aten.native_batch_norm\n", ".ops"),
    ("dist.all_reduce = lambda t, group=None: None\n", "patch"),  # dist: the setup cell's alias
    ("m = d2lite.distributed\nm.launch = fake_launch\n", "patch"),
    ("m = d2lite\n", "as a value"),
    ("mods = [torch]\nmods[0].save = fake_save\n", "as a value"),
    ("import torch.distributed as D\nhelper(D)\n", "as a value"),
    # the red team's: the caller's frames, the garbage collector and a module held by another
    ("tb = os.sys.exc_info()[2]\n", ".sys"),
    ("frame = getattr(tb, 'tb_frame')\n", "getattr"),
    ("f = getattr(getattr(g, 'gi_frame'), 'f_back')\n", "getattr"),
    ("while f is not None:\n    f = f.f_back\n", ".f_back"),
    ("loc = frame.f_locals\n", ".f_locals"),
    ("objs = os.sys.modules['gc'].get_objects()\n", ".sys"),
    ("def t():\n    return torch.nn.functional.torch\n", ".torch"),
    ("c = coro.cr_frame\n", ".cr_frame"),
])
def test_reaching_into_the_runtime_is_flagged(source, words):
    flags = check_cell(source, "mine")
    assert flags and all(f.kind == "machinery" for f in flags) and words in " ".join(map(str, flags)), flags


def test_library_normalization_in_an_answer_is_a_structure_finding():
    structure = {"batch_norm", "native_batch_norm", "BatchNorm1d"}
    flags = check_cell("def batch_norm(X, impl=F.batch_norm):\n    return nn.BatchNorm1d(3)(X)\n", "impl",
                       structure=structure)
    assert {f.kind for f in flags} == {"structure"} and {f.line for f in flags} == {1, 2}
