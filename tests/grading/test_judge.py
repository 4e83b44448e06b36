"""judge.py: the checker's records become verdicts and the autograded notebook's outputs; the
student reads each failed check's line and message, never hidden code or the grader's internals."""
import nbformat

from d2lite.grading import judge
from d2lite.grading.policy import Flag
from d2lite.grading.rebuild import Rebuilt


def _rebuilt():
    cells = [nbformat.v4.new_code_cell("def f(x):\n    return x"),
             nbformat.v4.new_code_cell("assert f(1) == 1, 'expected 1'\n### BEGIN HIDDEN TESTS\nassert f(2) == 2\n### END HIDDEN TESTS"),
             nbformat.v4.new_code_cell("with d2lite.forbid_calls():\n    f(3)")]
    for i, points in ((1, 2), (2, 1)):
        cells[i].metadata["nbgrader"] = {"grade": True, "grade_id": f"test_{i}", "points": points, "locked": True}
    return Rebuilt(nbformat.v4.new_notebook(cells=cells), ["solution", "test", "test"])


def test_a_test_passes_only_when_the_checker_says_so():
    rebuilt = _rebuilt()
    ends = {1: {"ok": True}, 2: {"ok": "yes"}}
    verdicts = judge.judge(rebuilt, ends, {}, "stopped")
    assert verdicts[1].passed and not verdicts[2].passed
    assert judge.points(rebuilt, verdicts) == (2.0, 3.0)


def test_a_test_that_never_ended_did_not_run_and_says_why():
    verdicts = judge.judge(_rebuilt(), {1: {"ok": True}}, {}, "the notebook was stopped after 30 s (wall-clock cap)")
    assert not verdicts[2].passed and "wall-clock" in verdicts[2].message and verdicts[2].reason == "did not run"


def test_a_finding_costs_only_the_tests_it_concerns():
    flag = Flag("machinery", "cell 3 (your own)", 1, "import sys", "imports sys")
    verdicts = judge.judge(_rebuilt(), {1: {"ok": True}, 2: {"ok": True}}, {2: [flag]}, "")
    assert verdicts[1].passed and not verdicts[2].passed and "import sys" in verdicts[2].message


def test_the_feedback_shows_the_line_and_message_and_hides_hidden_code():
    rebuilt = _rebuilt()
    ends = {0: {"ok": True, "stdout": "printed\n"},
            1: {"ok": False, "message": "expected 1, got 2", "line": 1, "hidden": False,
                "code": "assert f(1) == 1, 'expected 1'"},
            2: {"ok": False, "message": "your code raised ValueError in a hidden test", "line": 2, "hidden": True,
                "code": None}}
    verdicts = judge.judge(rebuilt, ends, {}, "")
    judge.compose(rebuilt, ends, verdicts)
    out0 = rebuilt.nb.cells[0].outputs
    assert out0[0]["text"] == "printed\n"
    error1 = rebuilt.nb.cells[1].outputs[-1]
    assert error1["evalue"] == "expected 1, got 2" and "line 1: assert f(1) == 1" in error1["traceback"][0]
    error2 = rebuilt.nb.cells[2].outputs[-1]
    text = " ".join(error2["traceback"]) + error2["evalue"]
    assert "hidden test" in text and "f(3)" not in text and "d2lite/grading" not in text


def test_records_cut_short_end_where_they_are_cut():
    data = b'{"t": "cell_start", "index": 0}\n{"t": "cell_end", "index": 0, "ok": true}\n{"t": "cell_end", "ind'
    ends, notes = judge.cell_events(judge.read_records(data))
    assert list(ends) == [0] and notes == []
