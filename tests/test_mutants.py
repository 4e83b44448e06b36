"""Mutation testing of the chapter's test cells: a fixed sample of each notebook's mutants must be killed
(or be equivalent), and the harness itself must be able to find a survivor.

CI runs a seeded sample of SAMPLE mutants per notebook, one worker process per notebook; set
D2LITE_MUTANTS=all to run every mutant here (`make mutants` does so and writes the report)."""
import ast
import os

import nbformat
import pytest

import mutation
from notebook_utils import NOTEBOOKS, SOLUTIONS, nbgrader_meta, read

SAMPLE = 20
EVERY = os.environ.get("D2LITE_MUTANTS", "").strip().lower() == "all"
OPERATORS = {"binop", "compare", "boolop", "constant", "reduction_dim", "keepdim_flipped", "detach_removed",
             "detach_added", "no_grad_removed", "no_grad_added", "keyword_dropped", "argument_dropped",
             "force_branch", "return_input", "return_swapped", "variance_bias", "shape_changed",
             "statement_deleted", "drop_operand", "method_swapped"}


def _gaps(result, mutants) -> list[str]:
    by_id = {m.id: m for m in mutants}
    return [f"{o.id}: every test cell passes, but {'; '.join(o.battery[:2])}\n{by_id[o.id].diff}"
            for o in result["outcomes"] if o.status == "survived"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_sampled_mutants_are_killed_or_equivalent(name):
    mutants = mutation.notebook_mutants(name)
    chosen = mutants if EVERY else mutation.sample(mutants, SAMPLE, seed=0)
    result = mutation.run_in_worker(SOLUTIONS / f"{name}.ipynb", chosen)
    assert result["reference"]["failed"] == [], f"the reference fails {result['reference']['failed']}"
    assert result["reference"]["battery"] == [], f"battery probes that raise on the reference: {result['reference']['battery']}"
    assert len(result["outcomes"]) == len(chosen)
    gaps = _gaps(result, chosen)
    assert not gaps, (f"{len(gaps)} mutant(s) of {name} pass every test cell, hidden tests included: strengthen "
                      "the test cells (see `make mutants`)\n\n" + "\n\n".join(gaps))


def test_generation_is_deterministic_distinct_and_covers_every_operator():
    seen = set()
    for name in NOTEBOOKS:
        first, second = mutation.notebook_mutants(name), mutation.notebook_mutants(name)
        assert [m.id for m in first] == [m.id for m in second]
        assert [m.source for m in first] == [m.source for m in second]
        cells = {c.grade_id: ast.unparse(ast.parse(c.source)) for c in mutation.read_cells(SOLUTIONS / f"{name}.ipynb")}
        assert len({(m.cell, m.source) for m in first}) == len(first), f"{name}: duplicate mutants"
        assert all(m.source != cells[m.cell] for m in first), f"{name}: a mutant equal to the reference"
        seen |= {m.operator for m in first}
    detach = "def f(x):\n    ### BEGIN SOLUTION\n    y = x.detach()\n    return y * 2\n    ### END SOLUTION\n"
    seen |= {m.operator for m in mutation.mutants_of(mutation.Cell(0, "solution", "f", detach))}
    assert OPERATORS <= seen, f"operators that produced no mutant anywhere: {sorted(OPERATORS - seen)}"
    assert mutation.sample(mutation.notebook_mutants("00_from_scratch"), 5) == \
        mutation.sample(mutation.notebook_mutants("00_from_scratch"), 5)


def test_only_the_solution_region_is_mutated():
    source = ("def f(x, y=2):\n    z = x + 1  # the scaffold, outside the region\n"
              "    ### BEGIN SOLUTION\n    return z * y\n    ### END SOLUTION\n")
    mutants = mutation.mutants_of(mutation.Cell(0, "solution", "f", source))
    assert mutants
    for m in mutants:
        assert "z = x + 1" in m.source and "def f(x, y=2):" in m.source, m.source
    assert {"binop", "drop_operand", "return_input"} <= {m.operator for m in mutants}


@pytest.mark.parametrize("code, fails", [("print('fine')", False), ("import sys; sys.stderr.write('x')", True),
                                         ("import warnings; warnings.warn('careful')", True),
                                         ("import os; os.write(2, b'low level')", True), ("1 / 0", True)])
def test_a_cell_fails_as_under_nbgrader(code, fails):
    assert (mutation._exec_cell(code, {}, "cell") is not None) == fails


def _tiny_notebook(path, test_source):
    nb = nbformat.v4.new_notebook()
    meta = lambda **kw: {"nbgrader": {"schema_version": 3, "locked": True, "solution": False, "grade": False, **kw}}
    nb.cells = [nbformat.v4.new_code_cell("import torch", metadata=meta(grade_id="setup")),
                nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION",
                                          metadata=meta(grade_id="f", locked=False, solution=True)),
                nbformat.v4.new_code_cell(test_source, metadata=meta(grade_id="test_f", grade=True, points=1))]
    nbformat.write(nb, str(path))
    return path


def test_a_hanging_mutant_is_killed_by_the_time_limit(tmp_path):
    path = _tiny_notebook(tmp_path / "tiny.ipynb", "assert f(1) == 2")
    hang = mutation.Mutant("f:hang:0:0", "f", "hang", 3, "def f(x):\n    while True:\n        pass")
    result = mutation.run_in_worker(path, [hang], timeout=3)
    assert [o.status for o in result["outcomes"]] == ["timeout"]


def _without_hidden_eval_tests(tmp_path):
    """A copy of 00_from_scratch whose test_eval has lost its hidden tests: a weak test cell."""
    nb = read(SOLUTIONS / "00_from_scratch.ipynb")
    cell = next(c for c in nb.cells if nbgrader_meta(c).get("grade_id") == "test_eval")
    cell.source = cell.source.split("### BEGIN HIDDEN TESTS")[0]
    path = tmp_path / "00_from_scratch.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_a_weak_test_cell_lets_a_planted_mutant_survive(tmp_path):
    # the evaluation branch broadcasts moving_mean with view(-1): right for (N, C), wrong for (N, C, H, W)
    planted = [m for m in mutation.notebook_mutants("00_from_scratch")
               if m.operator == "shape_changed" and "(X - moving_mean.view(-1))" in m.source]
    assert len(planted) == 1
    weak = mutation.run_in_worker(_without_hidden_eval_tests(tmp_path), planted)
    [outcome] = weak["outcomes"]
    assert outcome.status == "survived", outcome
    assert any("training=False" in line and "(4, 2, 3, 3)" in line for line in outcome.battery), outcome.battery
    strong = mutation.run_in_worker(SOLUTIONS / "00_from_scratch.ipynb", planted)
    [outcome] = strong["outcomes"]
    assert outcome.status == "killed" and outcome.failed == ["test_eval"], outcome


def test_killed_mutants_lose_points_through_d2lite_grade(tmp_path):
    """Each mistake the harness's test cells catch also loses points when graded for real: a seeded
    sample of each notebook's killed mutants, submitted as students and graded by `d2lite grade`
    (the checker and the student's oracle in the sandbox)."""
    from test_trusted_grading import MISSING
    if MISSING:
        pytest.skip(f"sandbox unavailable: {MISSING}")
    picks = []
    for name in NOTEBOOKS:
        chosen = mutation.sample(mutation.notebook_mutants(name), 3, seed=7)
        result = mutation.run_in_worker(SOLUTIONS / f"{name}.ipynb", chosen)
        picks += [(name, m) for m, o in zip(chosen, result["outcomes"]) if o.status in ("killed", "timeout", "crashed")]
    assert len({name for name, _ in picks}) == len(NOTEBOOKS), "the sample should hold killed mutants of every notebook"
    kept = [f"{name} {m.id}: {score:g}/{most:g}\n{m.diff}" for name, m, score, most in mutation.grade_mutants(tmp_path, picks)
            if score >= most]
    assert not kept, "mistakes the test cells catch kept every point under d2lite grade:\n" + "\n".join(kept)
