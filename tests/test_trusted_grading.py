"""`d2lite grade` against hostile and honest submissions: each kind of submission gets the exact
score it must get (never more than its honest twin: the same code without the trick) and none of
the side effects it tries. One batch grades them all (notebook 00_from_scratch, 14 autograded
points), which is itself the test that a mixed batch completes."""
import html
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid

import nbformat
import pytest
import torch
from nbgrader.api import Gradebook
from nbgrader.apps import NbGraderAPI

from notebook_utils import (ASSIGNMENT, NOTEBOOKS, SOLUTIONS, cell_by_id, nbgrader_config, nbgrader_env,
                            nbgrader_meta, new_course, read)
from redteam_cases import HELPER_MODULE, LAYER_NORM_AS_BATCH_NORM, MEMO_REPLAYS_THE_LIBRARY, OTHER_NOTEBOOKS
from test_grading import MISTAKES, _implementation

from d2lite.grading import sandbox
from d2lite.grading.runner import grade

try:
    sandbox.check_features()
    MISSING = None
except sandbox.SandboxUnavailable as error:
    MISSING = str(error)
needs_sandbox = pytest.mark.skipif(MISSING is not None, reason=f"sandbox unavailable: {MISSING}")

NB = "00_from_scratch"
FULL = 14
POINTS = {"test_train_2d": 2, "test_train_4d": 2, "test_eps": 1, "test_momentum": 1, "test_running_var": 2,
          "test_eval": 2, "test_structure": 1, "test_no_graph": 1, "test_gamma_beta_grads": 2}
CORRECT = _implementation()
EPS_FORGOTTEN = MISTAKES["eps_forgotten"][0]          # loses test_eps only: 13 of 14
MARK = uuid.uuid4().hex[:10]                          # names this run's side effects
LIMITS = sandbox.Limits(memory=3 << 30, wall=30, cpu=120, processes=64, output=4 << 20)


def _solution(nb, source):
    for cell in nb.cells:
        if nbgrader_meta(cell).get("grade_id") == "batch_norm_impl":
            cell.source = source
            return nb
    raise AssertionError("no batch_norm_impl cell")




def _with(source, prefix="", suffix=""):
    """The reference notebook with ``source`` as batch_norm_impl (plus lines before/after)."""
    return _solution(read(SOLUTIONS / f"{NB}.ipynb"), prefix + source + suffix)


def _tampered_test_cell(nb):
    cell_by_id(nb, "test_eps").source = "pass  # the student's own version of the test"
    return nb


def _deleted_test_cell(nb):
    nb.cells = [c for c in nb.cells if nbgrader_meta(c).get("grade_id") != "test_eps"]
    return nb


def _retyped_test_cell(nb):
    cell = cell_by_id(nb, "test_eps")
    index = nb.cells.index(cell)
    new = nbformat.v4.new_markdown_cell(cell.source)
    new.metadata = cell.metadata
    nb.cells[index] = new
    return nb


def _duplicated_test_cell(nb):
    cell = cell_by_id(nb, "test_eps")
    nb.cells.insert(nb.cells.index(cell), nbformat.from_dict(json.loads(json.dumps(cell))))
    return nb


def _inflated_points(nb):
    for cell in nb.cells:
        if nbgrader_meta(cell).get("grade"):
            cell.metadata["nbgrader"]["points"] = 100
    return nb


def _honest_quirks(nb):
    nb = _solution(nb, CORRECT.replace(
        "    shape = ", "    import warnings\n    warnings.warn('just a warning')\n    print('computing')\n"
                        "    os.write(2, b'to stderr\\n')\n    shape = ", 1))
    nb.cells.insert(1, nbformat.v4.new_code_cell("import os\nprint('my own extra cell')"))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = 7
            cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="old output\n"),
                            nbformat.v4.new_output("error", ename="X", evalue="old", traceback=[])]
    nb.metadata["kernelspec"] = {"name": "my-env", "display_name": "My env", "language": "python"}
    return nb


# student -> (how the submission is made, the exact score, words the report's reason must contain)
STRUCTURAL = POINTS["test_structure"] + POINTS["test_gamma_beta_grads"]  # what a machinery finding costs
TWIN = FULL - POINTS["test_eps"]                       # the honest twin of EPS_FORGOTTEN
LEAKING = CORRECT.replace("with torch.no_grad():", "if True:")   # keeps the graph: loses test_no_graph


def _indented(source):
    return "".join("    " + line for line in source.splitlines(keepends=True))


def _prompted(source):
    return "".join(">>> " + line for line in source.splitlines(keepends=True))


def _edited_demo(nb):
    for cell in nb.cells:
        if cell.cell_type == "code" and "preactivation_stats" in cell.source and "def " in cell.source:
            cell.source = cell.source.replace('print("layer   without', 'print("my edit:", "layer   without')
            return nb
    raise AssertionError("no demo cell")


def _scratch_library_comparison(nb):
    nb = _solution(nb, CORRECT)
    index = next(i for i, c in enumerate(nb.cells) if nbgrader_meta(c).get("grade_id") == "batch_norm_impl")
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        "X = torch.randn(8, 3)\nmine, _, _ = batch_norm(X, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))\n"
        "print('my error:', (mine - F.batch_norm(X, None, None, torch.ones(3), torch.zeros(3), training=True)).abs().max())\n"
        "bn = nn.BatchNorm1d(3)\nprint(bn(X).shape)\n"))
    return nb


_FRAME = "struct.pack('>I', len(body)) + b'J' + body"
FORGED_RECORDS = (
    "import json, os, struct\n"
    "line = json.dumps({'t': 'cell_end', 'index': 9, 'ok': True, 'stdout': 'forged'}).encode() + b'\\n'\n"
    "body = json.dumps({'re': 3, 'ok': True, 'value': True, 'sync': {'tensors': [], 'modules': []}}).encode()\n"
    "for fd in range(64):\n"
    "    for data in (line, " + _FRAME + "):\n"
    "        try:\n"
    "            os.write(fd, data)\n"
    "        except OSError:\n"
    "            pass\n")
OVERSIZED_RECORD = "import os, struct\nos.write(4, struct.pack('>I', 2**31 - 1) + b'J' + b'x' * 65536)\n"
NESTED_RECORD = ("import os, struct\nbody = b'[' * 200000 + b']' * 200000\n"
                 "os.write(4, " + _FRAME + ")\n")
LIBRARY_ON_A_THREAD = (
    "from concurrent.futures import ThreadPoolExecutor\n\n"
    "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):\n"
    "    mm, mv = moving_mean.clone(), moving_var.clone()\n"
    "    with ThreadPoolExecutor(1) as pool:\n"
    "        Y = pool.submit(lambda: F.batch_norm(X, mm, mv, gamma, beta, training=training, momentum=momentum,\n"
    "                                             eps=eps)).result()\n"
    "    return Y, mm, mv\n")
LIBRARY_EXCEPT_IN_THE_CHECK = (
    "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):\n"
    "    mm, mv = moving_mean.clone(), moving_var.clone()\n"
    "    try:\n"
    "        Y = F.batch_norm(X, mm, mv, gamma, beta, training=training, momentum=momentum, eps=eps)\n"
    "    except Exception:\n"
    "        return torch.zeros_like(X), moving_mean, moving_var  # something harmless inside the check\n"
    "    return Y, mm, mv\n")
READS_EXPECTED = (
    "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):\n"
    "    try:\n"
    "        return expected, expected_mean, expected_var  # a test cell's expected values, were they here\n"
    "    except NameError:\n"
    "        return X, moving_mean, moving_var\n")
READS_NOTHING = READS_EXPECTED.replace("        return expected, expected_mean, expected_var", "        return undefined_name")
LYING_GRAPH_FLAGS = LEAKING + (
    "\n\nclass NoGraph(torch.Tensor):\n"
    "    @property\n    def requires_grad(self):\n        return False\n\n"
    "    @property\n    def grad_fn(self):\n        return None\n\n\n"
    "_leaky = batch_norm\n\n\n"
    "def batch_norm(*args, **kwargs):\n"
    "    Y, mm, mv = _leaky(*args, **kwargs)\n"
    "    return Y, mm.as_subclass(NoGraph), mv.as_subclass(NoGraph)\n")
ALWAYS_EQUAL = EPS_FORGOTTEN + (
    "\n\nclass Same:\n    def __eq__(self, other):\n        return True\n\n"
    "    def __bool__(self):\n        return True\n\n\n"
    "_plain = batch_norm\n\n\n"
    "def batch_norm(*args, **kwargs):\n"
    "    Y, mm, mv = _plain(*args, **kwargs)\n"
    "    return (Same(), mm, mv) if kwargs.get('eps') == 1.0 else (Y, mm, mv)\n")
ALIAS_REACHES_ORACLE = ("P = d2lite.grading.oracle.Oracle\n"
                        "P.encode = lambda self, value: True  # every answer: True\n")
SYS_OF_ANOTHER_MODULE = ("torch.sys.modules['d2lite.grading.checker'].run_test = lambda *a, **k: {'ok': True}\n"
                         "torch.sys.modules['d2lite.grading.oracle'].Oracle.encode = lambda self, value: True\n")

# student -> (how the submission is made, the exact score, words the report's reason must contain)
CASES = {
    "honest": (lambda: _with(CORRECT), FULL, ""),
    # patches of libraries and of the grader: they change nothing the checker uses; the policy's
    # machinery finding costs the structural tests (whose library block runs in the student's process)
    "patch_d2lite_assert_close": (lambda: _with(EPS_FORGOTTEN, "d2lite.assert_close = lambda *a, **k: None\n"), TWIN - STRUCTURAL, "machinery"),
    "patch_torch_testing": (lambda: _with(EPS_FORGOTTEN, "torch.testing.assert_close = lambda *a, **k: None\n"), TWIN - STRUCTURAL, "patch"),
    "patch_F_batch_norm": (lambda: _with(EPS_FORGOTTEN, "F.batch_norm = lambda X, *a, **k: X\n"), TWIN - STRUCTURAL, "patch"),
    "replace_code_object": (lambda: _with(EPS_FORGOTTEN, "d2lite.checks.assert_close.__code__ = (lambda *a, **k: None).__code__\n"), TWIN - STRUCTURAL, "__code__"),
    "input_transformer": (lambda: _with(EPS_FORGOTTEN, "get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])\n"), TWIN - STRUCTURAL, "get_ipython"),
    "exception_hook": (lambda: _with(EPS_FORGOTTEN, "get_ipython().set_custom_exc((Exception,), lambda *a, **k: None)\n"), TWIN - STRUCTURAL, "get_ipython"),
    "sys_excepthook": (lambda: _with(EPS_FORGOTTEN, "import sys\nsys.excepthook = lambda *a: None\n"), TWIN - STRUCTURAL, "sys"),
    "probe_tampering": (lambda: _with(EPS_FORGOTTEN, "__d2lite_probe__.check = lambda site, test: True\n"), 0, "__d2lite_probe__"),
    "builtins_patch": (lambda: _with(EPS_FORGOTTEN, "import builtins\nbuiltins.bool = lambda x: True\n"), None, "builtins"),
    "getattr_reach": (lambda: _with(EPS_FORGOTTEN, "getattr(d2lite, 'assert_close')\n"), TWIN - STRUCTURAL, "getattr"),
    # the grader's own processes, reached through a module alias or another module's sys
    "alias_reaches_oracle": (lambda: _with(EPS_FORGOTTEN, ALIAS_REACHES_ORACLE), 0, "test_train_2d"),
    "sys_of_another_module": (lambda: _with(EPS_FORGOTTEN, SYS_OF_ANOTHER_MODULE), 0, "machinery"),
    # IPython's input transforms: the policy reads the code as it will run
    "magic_hides_a_patch": (lambda: _with(EPS_FORGOTTEN, "%time 1\nd2lite.assert_close = lambda *a, **k: None\n"), TWIN - STRUCTURAL, "machinery"),
    "indented_cell_hides_a_patch": (lambda: _solution(read(SOLUTIONS / f"{NB}.ipynb"), _indented(
        "import sys\nsys.modules['d2lite'].assert_close = lambda *a, **k: None\n" + EPS_FORGOTTEN)), TWIN - STRUCTURAL, "machinery"),
    "prompts_hide_a_patch": (lambda: _solution(read(SOLUTIONS / f"{NB}.ipynb"), _prompted(
        "d2lite.assert_close = lambda *a, **k: None\n" + EPS_FORGOTTEN)), TWIN - STRUCTURAL, "machinery"),
    "syntax_error_is_flagged": (lambda: _with("def batch_norm(:\n    pass\n"), POINTS["test_gamma_beta_grads"], "syntax"),
    # the test cells' expected values never enter the student's process
    "reads_expected_value": (lambda: _with(READS_EXPECTED), None, "test_train_2d"),
    # the channel to the checker: forged, oversized and deeply nested records
    "forged_records_everywhere": (lambda: _with(EPS_FORGOTTEN, FORGED_RECORDS), 0, "protocol"),
    "oversized_record": (lambda: _with(EPS_FORGOTTEN, OVERSIZED_RECORD), 0, "protocol"),
    "deeply_nested_record": (lambda: _with(EPS_FORGOTTEN, NESTED_RECORD), 0, "protocol"),
    # returned objects that lie: equality, and a tensor's graph flags
    "always_equal_object": (lambda: _with(ALWAYS_EQUAL), TWIN, "test_eps"),
    "lying_graph_flags": (lambda: _with(LYING_GRAPH_FLAGS), FULL - POINTS["test_no_graph"], "test_no_graph"),
    "leaking_graph": (lambda: _with(LEAKING), FULL - POINTS["test_no_graph"], "test_no_graph"),
    # library batch norm: judged by the values it gives with library normalization unavailable
    "library_in_default_argument": (lambda: _with(
        "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True, impl=F.batch_norm):\n"
        "    mm, mv = moving_mean.clone(), moving_var.clone()\n"
        "    Y = impl(X, mm, mv, gamma, beta, training=training, momentum=momentum, eps=eps)\n"
        "    return Y, mm, mv\n"), FULL - POINTS["test_structure"], "library"),
    "library_via_torch_ops": (lambda: _with(
        "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):\n"
        "    return torch.ops.aten.native_batch_norm(X, gamma, beta, moving_mean, moving_var, training, momentum, eps)\n"), None, ".ops"),
    "library_module": (lambda: _with(
        "def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):\n"
        "    bn = nn.BatchNorm1d(X.shape[1], eps=eps, momentum=momentum).double()\n"
        "    return bn(X), bn.running_mean, bn.running_var\n"), None, "library"),
    "library_on_a_thread": (lambda: _with(LIBRARY_ON_A_THREAD), FULL - POINTS["test_structure"], "library"),
    "library_except_in_the_check": (lambda: _with(LIBRARY_EXCEPT_IN_THE_CHECK), FULL - POINTS["test_structure"], "test_structure"),
    "layer_norm_as_batch_norm": (lambda: _with(LAYER_NORM_AS_BATCH_NORM), FULL - POINTS["test_structure"], "library"),
    "memo_replays_the_library": (lambda: _with(MEMO_REPLAYS_THE_LIBRARY), FULL - STRUCTURAL, "machinery"),
    "honest_helper_module": ("helper", FULL, ""),
    # test cells the student changed, deleted, retyped, pasted twice, or inflated
    "tampered_test_cell": (lambda: _tampered_test_cell(_with(EPS_FORGOTTEN)), TWIN, "test_eps"),
    "deleted_test_cell": (lambda: _deleted_test_cell(_with(EPS_FORGOTTEN)), TWIN, "put back"),
    "retyped_test_cell": (lambda: _retyped_test_cell(_with(EPS_FORGOTTEN)), TWIN, "test_eps"),
    "duplicated_test_cell": (lambda: _duplicated_test_cell(_with(CORRECT)), FULL, "ordinary cell"),
    "inflated_points": (lambda: _inflated_points(_with(CORRECT)), FULL, ""),
    # unreadable submissions
    "symlink_to_source": ("symlink", 0, "symbolic link"),
    "corrupt_json": (b'{"cells": [', 0, "not valid JSON"),
    "not_a_notebook": (b"\x89PNG\r\n\x1a\n\x00\x00", 0, "not valid JSON"),
    "json_not_a_notebook": (b'[1, 2, 3]', 0, "not a notebook"),
    # the machine: exits, kills, loops, bombs, processes, network, files, output
    "os_exit": (lambda: _with(CORRECT, "import os\nos._exit(0)\n"), 0, "_exit"),
    "crash_by_kill": (lambda: _with(CORRECT, "import os\nos.kill(os.getpid(), 9)\n"), 0, "ended"),
    "infinite_loop": (lambda: _with(CORRECT, "while True:\n    pass\n"), 0, "wall-clock"),
    "memory_bomb": (lambda: _with(CORRECT, "hog = []\nwhile True:\n    hog.append(torch.ones(64 << 20, dtype=torch.uint8))\n"), 0, "memory cap"),
    "orphan_processes": (lambda: _with(CORRECT, "import subprocess\nfor i in range(3):\n    subprocess.Popen(['setsid', 'sleep', '314160'])\n"), FULL, ""),
    "network": ("network", FULL, ""),
    "read_course_files": ("read", FULL, ""),
    "write_outside": ("write", FULL, ""),
    "print_60mb": (lambda: _with(CORRECT, "print('x' * 60_000_000)\n"), FULL, ""),
    "raw_output_60mb": (lambda: _with(CORRECT, "import os\nfor _ in range(60):\n    os.write(1, b'x' * 1_000_000)\n"), 0, "output"),
    "shadow_module": ("shadow", TWIN, "test_eps"),
    # honest students lose nothing: prints, warnings, stderr, magics, extra cells, scratch checks
    # against PyTorch, an edited demo cell
    "honest_quirks": (lambda: _honest_quirks(read(SOLUTIONS / f"{NB}.ipynb")), FULL, ""),
    "honest_magic": (lambda: _with(CORRECT, "%time 1 + 1\n"), FULL, ""),
    "scratch_library_comparison": (lambda: _scratch_library_comparison(read(SOLUTIONS / f"{NB}.ipynb")), FULL, ""),
    "edited_demo_cell": (lambda: _edited_demo(_with(CORRECT)), FULL, ""),
}
for _name, (_source, _target, _word) in MISTAKES.items():
    CASES[f"mistake_{_name}"] = ((lambda s=_source: _with(s)), FULL - POINTS[_target], _target)
# (attack, its honest twin): the attack never scores more
TWINS = {"reads_expected_value": READS_NOTHING, "library_via_torch_ops": None, "library_module": None,
         "builtins_patch": EPS_FORGOTTEN}


def _course(tmp_path_factory):
    """A fresh course with the assignment generated (skips where the sandbox is unavailable)."""
    if MISSING:
        pytest.skip(f"sandbox unavailable: {MISSING}")
    root = tmp_path_factory.mktemp("course")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", nbgrader_env()["PATH"])
        new_course(root, tmp_path_factory.mktemp("exchange"))
    return root


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    CASES.setdefault("twin_of_reads_expected_value", (lambda: _with(READS_NOTHING), None, ""))
    root = _course(tmp_path_factory)
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", nbgrader_env()["PATH"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.2)
    port, connections, stop = listener.getsockname()[1], [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except OSError:
                pass
    threading.Thread(target=accept, daemon=True).start()
    outside = tmp_path_factory.mktemp("outside")
    secrets = {"solution": str(root / "solutions" / ASSIGNMENT / f"{NB}.ipynb"), "gradebook": str(root / "gradebook.db")}
    for student, (make, _, _) in CASES.items():
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        path = folder / f"{NB}.ipynb"
        if make == "symlink":
            os.symlink(root / "solutions" / ASSIGNMENT / f"{NB}.ipynb", path)
        elif isinstance(make, bytes):
            path.write_bytes(make)
        else:
            if make == "network":
                nb = _with(CORRECT, "import socket\ntry:\n    socket.create_connection(('127.0.0.1', "
                                    f"{port}), timeout=2)\n    print('CONNECTED')\nexcept OSError as e:\n    print('no network:', e)\n")
            elif make == "read":
                nb = _with(CORRECT, "".join(f"try:\n    print(open({p!r}, 'rb').read()[:100000])\nexcept OSError as e:\n"
                                            f"    print('cannot read', e)\n" for p in secrets.values()))
            elif make == "write":
                nb = _with(CORRECT, "".join(f"try:\n    open({p!r}, 'w').write('pwned')\nexcept OSError as e:\n    print(e)\n"
                                            for p in (str(root / f"pwned-{MARK}"), str(outside / "pwned"),
                                                      f"/tmp/pwned-{MARK}", str(root / "gradebook.db"))))
            elif make == "helper":  # the answer kept in a module of the student's own
                (folder / "bn_helper.py").write_text(HELPER_MODULE)
                nb = _with("from bn_helper import batch_norm\n")
            elif make == "shadow":
                (folder / "d2lite.py").write_text("def assert_close(*a, **k):\n    pass\n")
                nb = _with(EPS_FORGOTTEN, "import d2lite\n")
            else:
                nb = make()
            nbformat.write(nb, str(path))
    gradebook_before = (root / "gradebook.db").stat().st_size
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=[NB], echo=lambda *a: None)
    stop.set()
    listener.close()
    mp.undo()
    yield {"root": root, "rows": {r.student: r for r in rows}, "connections": connections,
           "outside": outside, "gradebook_before": gradebook_before}


def _gradebook_scores(root, student):
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook(NB, ASSIGNMENT, student)
        return {g.name: g.auto_score for g in nb.grades if g.auto_score is not None and g.cell.cell_type == "code"}


@pytest.mark.parametrize("student", [s for s in CASES if CASES[s][1] is not None])
def test_each_kind_of_submission_gets_its_exact_score(graded, student):
    row = graded["rows"][student]
    _, expected, word = CASES[student]
    assert row.max_score == FULL, f"{student}: max score {row.max_score}, expected {FULL} (points from the gradebook)"
    assert row.score == expected, f"{student}: got {row.score}/{FULL}, expected {expected}; reasons: {row.reason}"
    assert word in row.reason, f"{student}: the report should say {word!r}, says: {row.reason!r}"
    scores = _gradebook_scores(graded["root"], student)
    assert sum(scores.values()) == expected, f"{student}: the gradebook says {scores}"


@pytest.mark.parametrize("student", sorted(TWINS))
def test_an_attack_never_scores_more_than_its_honest_twin(graded, student):
    rows = graded["rows"]
    twin = TWINS[student]
    ceiling = rows["twin_of_reads_expected_value"].score if student == "reads_expected_value" else \
        (TWIN if twin == EPS_FORGOTTEN else FULL - POINTS["test_structure"])
    assert rows[student].score <= ceiling, f"{student}: {rows[student].score} > its honest twin's {ceiling}: {rows[student].reason}"
    assert CASES[student][2] in rows[student].reason, rows[student].reason


def test_library_module_inside_batch_norm_loses_the_structure_points(graded):
    row = graded["rows"]["library_module"]
    assert row.score <= FULL - 3 and "library" in row.reason, row.reason


def test_every_submission_of_the_mixed_batch_is_graded_once(graded):
    assert set(graded["rows"]) == set(CASES)
    with Gradebook(f"sqlite:///{graded['root'] / 'gradebook.db'}") as gb:
        submitted = {s.student.id for s in gb.find_assignment(ASSIGNMENT).submissions}
    assert submitted == set(CASES)
    for student in CASES:
        assert (graded["root"] / "autograded" / student / ASSIGNMENT / f"{NB}.ipynb").is_file(), student


def test_hostile_side_effects_did_not_happen(graded):
    root = graded["root"]
    assert graded["connections"] == [], "a sandbox reached a listener on the host's loopback"
    assert not (root / f"pwned-{MARK}").exists() and not (graded["outside"] / "pwned").exists()
    assert not os.path.exists(f"/tmp/pwned-{MARK}")
    assert (root / "gradebook.db").stat().st_size >= graded["gradebook_before"]
    with open(root / "gradebook.db", "rb") as fh:
        assert b"pwned" not in fh.read()
    leftover = subprocess.run(["pgrep", "-f", "sleep 314160"], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes a submission started are still running: {leftover}"
    graded_nb = nbformat.read(str(root / "autograded" / "read_course_files" / ASSIGNMENT / f"{NB}.ipynb"), 4)
    printed = "".join(str(o.get("text", "")) for c in graded_nb.cells for o in c.get("outputs", []))
    # both reads failed (the course directory is not in the sandbox); nothing of either file came out
    assert printed.count("cannot read") == 2 and "SQLite format" not in printed and "b'{" not in printed
    network_nb = nbformat.read(str(root / "autograded" / "network" / ASSIGNMENT / f"{NB}.ipynb"), 4)
    printed = "".join(str(o.get("text", "")) for c in network_nb.cells for o in c.get("outputs", []))
    assert "CONNECTED" not in printed and "no network" in printed


def test_caps_hold_while_running(graded):
    rows = graded["rows"]
    assert rows["infinite_loop"].seconds < LIMITS.wall + 15
    assert rows["memory_bomb"].peak_mib <= LIMITS.memory / 2**20 + 1
    for student in ("print_60mb", "raw_output_60mb"):
        size = (graded["root"] / "autograded" / student / ASSIGNMENT / f"{NB}.ipynb").stat().st_size
        assert size < 2 << 20, f"{student}: the autograded notebook is {size} bytes"


def test_regrading_is_idempotent(graded):
    root = graded["root"]
    before = _gradebook_scores(root, "mistake_eps_forgotten")
    rows = grade(root, ASSIGNMENT, students=["mistake_eps_forgotten"], limits=LIMITS, notebooks=[NB],
                 echo=lambda *a: None, force=True)
    assert [r.score for r in rows] == [FULL - 1]
    assert _gradebook_scores(root, "mistake_eps_forgotten") == before
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        assert len([s for s in gb.find_assignment(ASSIGNMENT).submissions
                    if s.student.id == "mistake_eps_forgotten"]) == 1


def test_feedback_shows_the_teaching_message_and_no_solution(graded):
    root = graded["root"]
    config = nbgrader_config(root=str(root))
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", nbgrader_env()["PATH"])
    result = NbGraderAPI(config=config).generate_feedback(ASSIGNMENT, "mistake_eps_forgotten")
    mp.undo()
    assert result["success"], result["error"]
    page = html.unescape((root / "feedback" / "mistake_eps_forgotten" / ASSIGNMENT / f"{NB}.html").read_text())
    # the failed check: its line and its message, with the hint
    assert "Test failed at line" in page and "Y with eps=1.0: expected" in page and "Hint: did you forget eps" in page
    # no reference solution, no hidden test code or inputs, no grader internals
    assert "new_var = (1 - momentum) * moving_var + momentum * var * m / (m - 1)" not in page
    for hidden in ("for N, C, eps, seed in ((8, 3, 0.5, 9), (40, 2, 3.0, 10)):", "BEGIN HIDDEN TESTS",
                   "chained_step", "X4 = torch.randn(4, 3, 2, 2, generator=g"):
        assert hidden not in page, hidden
    for internal in ("d2lite/grading", "__d2lite", "checker.py", "oracle.py", str(root)):
        assert internal not in page, internal


# --- without a sandbox --------------------------------------------------------------------------

def test_missing_kernel_features_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
        sandbox.check_features()


# --- the whole chapter ---------------------------------------------------------------------------

@needs_sandbox
def test_reference_solutions_get_every_point_and_the_release_none(tmp_path):
    root = tmp_path / "course"
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", nbgrader_env()["PATH"])
    new_course(root, tmp_path / "exchange")
    mp.undo()
    for student, folder in (("reference", root / "solutions" / ASSIGNMENT), ("untouched", root / "release" / ASSIGNMENT)):
        if not folder.is_dir():
            folder = root / "chapters" / ASSIGNMENT
        (root / "submitted" / student).mkdir(parents=True)
        shutil.copytree(folder, root / "submitted" / student / ASSIGNMENT)
    rows = grade(root, ASSIGNMENT, echo=lambda *a: None)
    by = {(r.student, r.notebook): r for r in rows}
    for name in NOTEBOOKS:
        ref, untouched = by[("reference", name)], by[("untouched", name)]
        assert ref.score == ref.max_score > 0, f"reference {name}: {ref.score}/{ref.max_score}: {ref.reason}"
        assert untouched.score == 0, f"untouched {name}: {untouched.score}: {untouched.reason}"


def test_autograded_gets_the_submissions_other_files_as_nbgrader_autograde_does(tmp_path):
    """timestamp.txt and the exchange's submission_secret.txt (release_feedback needs it) reach
    autograded/, so do the student's plain files; links, notebooks and ignored files do not, and
    the instructor's own files win."""
    from d2lite.grading.gradebook import copy_files

    submitted, source, autograded = tmp_path / "submitted", tmp_path / "source", tmp_path / "autograded"
    (submitted / "data").mkdir(parents=True)
    (submitted / "timestamp.txt").write_text("2026-12-02 18:31:59.959902 UTC\n")
    (submitted / "submission_secret.txt").write_text("f" * 128)
    (submitted / "data" / "notes.txt").write_text("mine")
    (submitted / "helper.py").write_text("# the student's")
    (submitted / "00_from_scratch.ipynb").write_text("{}")
    (submitted / "figure.png").write_bytes(b"\x89PNG")
    (submitted / "passwd").symlink_to("/etc/passwd")
    (submitted / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("not to be copied")
    (submitted / ".ipynb_checkpoints").mkdir()
    (submitted / ".ipynb_checkpoints" / "old.txt").write_text("old")
    source.mkdir()
    (source / "helper.py").write_text("# the instructor's")
    (source / "00_from_scratch.ipynb").write_text("{}")

    stamp = copy_files(submitted, autograded, source, [".ipynb_checkpoints", "*.png"])
    assert stamp == "2026-12-02 18:31:59.959902 UTC"
    copied = sorted(p.relative_to(autograded).as_posix() for p in autograded.rglob("*") if p.is_file())
    assert copied == ["data/notes.txt", "helper.py", "submission_secret.txt", "timestamp.txt"]
    assert (autograded / "helper.py").read_text() == "# the instructor's"
    assert not any(p.is_symlink() for p in autograded.rglob("*"))


@pytest.fixture(scope="module")
def other_notebooks(tmp_path_factory):
    """Attacks on the other notebooks, each graded beside its honest twin in one batch."""
    root = _course(tmp_path_factory)
    for name, students in OTHER_NOTEBOOKS.items():
        for student, (grade_id, source) in students.items():
            folder = root / "submitted" / student / ASSIGNMENT
            folder.mkdir(parents=True)
            nb = read(SOLUTIONS / f"{name}.ipynb")
            cell_by_id(nb, grade_id).source = source
            nbformat.write(nb, str(folder / f"{name}.ipynb"))
    rows = grade(root, ASSIGNMENT, limits=LIMITS, notebooks=list(OTHER_NOTEBOOKS), echo=lambda *a: None)
    return {(r.student, r.notebook): r for r in rows}


@pytest.mark.parametrize("name, attack", [(n, s) for n, students in OTHER_NOTEBOOKS.items()
                                          for s in students if not s.endswith("_twin")])
def test_attacks_on_the_other_notebooks_score_less_than_their_twins_or_equal(other_notebooks, name, attack):
    """04: an object whose subtraction answers 0.0; 05: an object of the student's that stands in for
    the layer; 07: layer norm standing in for batch norm; 09: inputs changed in place."""
    row, twin = other_notebooks[(attack, name)], other_notebooks[(f"{attack}_twin", name)]
    assert row.score <= twin.score, f"{attack}: {row.score} > its twin's {twin.score}: {row.reason}"
    assert row.score < row.max_score, f"{attack}: full marks ({row.reason})"
