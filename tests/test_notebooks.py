"""The chapter's notebooks: all there, committed clean, and every solution runs under the grading budget."""
import json
import time

import nbclient
import pytest

from notebook_utils import (CHAPTERS, NOTEBOOKS, SOLUTIONS, grade_cells, nbgrader_config,
                            nbgrader_env, nbgrader_meta, read)

COMMITTED = sorted(SOLUTIONS.glob("*.ipynb")) + sorted(CHAPTERS.glob("*.ipynb"))


def test_every_exercise_has_a_solution_and_a_released_notebook():
    assert sorted(p.stem for p in SOLUTIONS.glob("*.ipynb")) == NOTEBOOKS
    assert sorted(p.stem for p in CHAPTERS.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_committed_notebooks_carry_no_outputs(path):
    nb = read(path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_solution_notebooks_are_well_formed(name):
    nb = read(SOLUTIONS / f"{name}.ipynb")
    ids = [nbgrader_meta(c).get("grade_id") for c in nb.cells if nbgrader_meta(c)]
    assert len(ids) == len(set(ids)), f"duplicate grade_ids in {name}"
    tests = [c for c in grade_cells(nb) if c.cell_type == "code"]
    assert tests, f"{name} has no autograded test cell"
    for cell in tests:
        meta = nbgrader_meta(cell)
        assert meta.get("locked") and meta.get("points", 0) > 0, meta["grade_id"]
        assert cell.source.lstrip().startswith("#"), (
            f"{meta['grade_id']}: a test cell opens with a comment saying what it checks")
        assert "BEGIN HIDDEN TESTS" in cell.source or "hidden" in meta.get("grade_id", ""), (
            f"{meta['grade_id']}: no hidden tests")
    assert any("BEGIN SOLUTION" in c.source for c in nb.cells if nbgrader_meta(c).get("solution"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_solution_runs_under_grading_budget_without_errors_or_stderr_in_tests(name, monkeypatch):
    monkeypatch.setenv("D2LITE_BUDGET", "grading")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as nbgrader_config.py sets for graded kernels
    nb = read(SOLUTIONS / f"{name}.ipynb")
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(SOLUTIONS)}}).execute()
    seconds = time.perf_counter() - start
    for cell in grade_cells(nb):
        if cell.cell_type != "code":
            continue
        stderr = [o.get("text", "") for o in cell.outputs
                  if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, (f"test cell {nbgrader_meta(cell)['grade_id']} wrote to stderr "
                            f"(nbgrader would score it 0): {''.join(stderr)[:500]}")
    print(f"{name}: {seconds:.1f} s")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_nbgrader_validate_passes(name, monkeypatch):
    """nbgrader's own validator (what a student's "Validate" button runs): every test passes."""
    from nbgrader.validator import Validator

    monkeypatch.setenv("PATH", nbgrader_env()["PATH"])
    results = Validator(config=nbgrader_config()).validate(str(SOLUTIONS / f"{name}.ipynb"))
    assert results == {}, json.dumps(results, indent=1)[:3000]
