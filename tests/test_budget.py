"""d2lite.budget: the one place that sizes experiments."""
import pytest

from d2lite import get_budget, is_grading
from d2lite.budget import FULL, GRADING


def test_full_by_default():
    assert get_budget() is FULL and not is_grading()
    assert FULL.epochs(10) == 10 and FULL.data_kwargs() == {"subset": None, "test_subset": None}


def test_grading_under_nbgrader(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert get_budget() is GRADING and is_grading()
    assert GRADING.epochs(10) == GRADING.max_epochs < 10
    assert GRADING.epochs(1) == 1
    assert GRADING.choose([0.1, 1, 10], [1]) == [1]
    assert GRADING.data_kwargs()["subset"] < 10_000


def test_variable_wins_over_nbgrader(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    monkeypatch.setenv("D2LITE_BUDGET", "full")
    assert get_budget() is FULL
    monkeypatch.delenv("NBGRADER_EXECUTION")
    monkeypatch.setenv("D2LITE_BUDGET", "Grading")
    assert get_budget() is GRADING


def test_unknown_budget_is_an_error(monkeypatch):
    monkeypatch.setenv("D2LITE_BUDGET", "tiny")
    with pytest.raises(ValueError, match="D2LITE_BUDGET must be one of"):
        get_budget()
