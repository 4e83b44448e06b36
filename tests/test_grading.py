"""The nbgrader pipeline end to end, through nbgrader's own API, in a temporary course directory:
generate_assignment → autograde (reference solutions, untouched release, typical mistakes) →
generate_feedback → export (grades.csv)."""
import csv
import html

import nbformat
import pytest
from nbgrader.api import Gradebook
from nbgrader.plugins.export import CsvExportPlugin

from notebook_utils import (ASSIGNMENT, CHAPTERS, NOTEBOOKS, SOLUTIONS, grade_cells, nbgrader_env,
                            nbgrader_meta, new_course, read)

REFERENCE = '''
def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):
    shape = (1, -1) if X.dim() == 2 else (1, -1, 1, 1)
    if not training:
        X_hat = (X - moving_mean.view(shape)) / torch.sqrt(moving_var.view(shape) + EPS)
        return gamma.view(shape) * X_hat + beta.view(shape), moving_mean, moving_var
    dims = AXES
    mean = X.mean(dim=dims)
    var = ((X - mean.view(shape)) ** 2).mean(dim=dims)
    X_hat = (X - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    n = X.numel() // X.shape[1]
    with torch.no_grad():
        new_mean = (1 - momentum) * moving_mean + momentum * mean
        new_var = (1 - momentum) * moving_var + momentum * RUNNING_VAR
    return gamma.view(shape) * X_hat + beta.view(shape), new_mean, new_var
'''
CORRECT = {"EPS": "eps", "AXES": "(0,) if X.dim() == 2 else (0, 2, 3)",
           "RUNNING_VAR": "var * n / (n - 1)"}


def _implementation(**mistake) -> str:
    source = REFERENCE
    for key, value in {**CORRECT, **mistake}.items():
        source = source.replace(key, value)
    return source.strip()


def _eval_with_batch_statistics() -> str:
    # the eval branch normalizes with the batch's statistics instead of the moving ones
    return _implementation().replace(
        "X_hat = (X - moving_mean.view(shape)) / torch.sqrt(moving_var.view(shape) + eps)",
        "dims = (0,) if X.dim() == 2 else (0, 2, 3)\n"
        "        mean, var = X.mean(dim=dims), X.var(dim=dims, unbiased=False)\n"
        "        X_hat = (X - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)")


# mistake -> (its batch_norm, the test cell that targets it, a word its feedback must contain)
MISTAKES = {
    "biased_running_var": (_implementation(RUNNING_VAR="var"), "test_running_var", "unbiased"),
    "wrong_axes": (_implementation(AXES="(0,) if X.dim() == 2 else (0, 1, 2, 3)"),
                   "test_train_4d", "axes"),
    "eps_forgotten": (_implementation(EPS="0"), "test_eps", "eps"),
    "momentum_inverted": (_implementation().replace(
        "(1 - momentum) * moving_mean + momentum * mean",
        "momentum * moving_mean + (1 - momentum) * mean").replace(
        "(1 - momentum) * moving_var + momentum * var",
        "momentum * moving_var + (1 - momentum) * var"), "test_momentum", "momentum"),
    "batch_stats_in_eval": (_eval_with_batch_statistics(), "test_eval", "moving"),
}


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course directory with the solutions, a gradebook, and an NbGraderAPI on it."""
    root = tmp_path_factory.mktemp("course")
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", nbgrader_env()["PATH"])
    api = new_course(root, tmp_path_factory.mktemp("exchange"))
    yield root, api
    mp.undo()


def _submit(root, student, notebooks: dict[str, nbformat.NotebookNode]):
    folder = root / "submitted" / student / ASSIGNMENT
    folder.mkdir(parents=True)
    for name, nb in notebooks.items():
        nbformat.write(nb, str(folder / f"{name}.ipynb"))


def _autograde(root, api, student) -> dict[str, dict[str, tuple]]:
    result = api.autograde(ASSIGNMENT, student, force=True, create=True)
    assert result["success"], result["error"] + result["log"][-3000:]
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        submission = gb.find_submission(ASSIGNMENT, student)
        return {nb.name: {g.name: (g.auto_score, g.max_score) for g in nb.grades}
                for nb in submission.notebooks}


def _autograded_points(scores):
    return {nb: {cell: got for cell, (got, _) in cells.items() if got is not None}
            for nb, cells in scores.items()}


def test_released_chapters_equal_what_nbgrader_generates(course):
    root, _ = course
    for name in NOTEBOOKS:
        generated = read(root / "chapters" / ASSIGNMENT / f"{name}.ipynb")
        committed = read(CHAPTERS / f"{name}.ipynb")
        assert committed == generated, (
            f"chapters/{ASSIGNMENT}/{name}.ipynb differs from what `nbgrader generate_assignment "
            f"{ASSIGNMENT}` makes of solutions/: regenerate it, never edit it by hand")


def test_reference_solutions_get_every_autograded_point(course):
    root, api = course
    _submit(root, "reference", {n: read(SOLUTIONS / f"{n}.ipynb") for n in NOTEBOOKS})
    scores = _autograde(root, api, "reference")
    assert sorted(scores) == NOTEBOOKS
    lost = {f"{nb}/{cell}": (got, most) for nb, cells in scores.items()
            for cell, (got, most) in cells.items() if got is not None and got < most}
    assert not lost, f"the reference solutions lose points: {lost}"
    result = api.generate_feedback(ASSIGNMENT, "reference")
    assert result["success"], result["error"]
    feedback = root / "feedback" / "reference" / ASSIGNMENT
    assert sorted(p.stem for p in feedback.glob("*.html")) == NOTEBOOKS
    grades = root / "grades.csv"
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        CsvExportPlugin(to=str(grades)).export(gb)
    rows = {r["student_id"]: r for r in csv.DictReader(grades.open())}
    total = sum(most for cells in scores.values() for got, most in cells.values() if got is not None)
    assert float(rows["reference"]["raw_score"]) == pytest.approx(total)


def test_untouched_release_scores_zero_without_crashing(course):
    root, api = course
    _submit(root, "untouched", {n: read(root / "chapters" / ASSIGNMENT / f"{n}.ipynb")
                                for n in NOTEBOOKS})
    scores = _autograde(root, api, "untouched")
    earned = {f"{nb}/{cell}": got for nb, cells in _autograded_points(scores).items()
              for cell, got in cells.items() if got}
    assert not earned, f"an unanswered notebook earned points: {earned}"


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_typical_mistake_loses_exactly_its_tests_points(course, mistake):
    root, api = course
    source, target, keyword = MISTAKES[mistake]
    nb = read(SOLUTIONS / "00_from_scratch.ipynb")
    impl = [c for c in nb.cells if nbgrader_meta(c).get("grade_id") == "batch_norm_impl"]
    assert len(impl) == 1, "00_from_scratch needs exactly one cell with grade_id batch_norm_impl"
    impl[0].source = source
    student = f"mistake_{mistake}"
    _submit(root, student, {"00_from_scratch": nb})
    scores = _autograde(root, api, student)["00_from_scratch"]
    lost = {cell for cell, (got, most) in scores.items() if got is not None and got < most}
    assert lost == {target}, f"{mistake}: expected to lose only {target}, lost {sorted(lost)}"
    result = api.generate_feedback(ASSIGNMENT, student)
    assert result["success"], result["error"]
    page = html.unescape((root / "feedback" / student / ASSIGNMENT / "00_from_scratch.html").read_text())
    assert keyword in page, f"the feedback for {mistake} never mentions {keyword!r}"
