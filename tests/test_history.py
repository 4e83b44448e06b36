"""d2lite.history: the run record, and the import structure around it (train and plot meet only there)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import d2lite
from d2lite.history import EpochStats, History

PACKAGE = Path(d2lite.__file__).resolve().parent


def _history(test_accs, seconds=2.0, train_seconds=1.0, num_examples=100):
    return History(name="run", epochs=[
        EpochStats(epoch=i, train_loss=1.0 / i, train_acc=acc - 0.1, test_acc=acc, lr=0.1,
                   examples_per_sec=0.0, seconds=seconds, num_examples=num_examples,
                   train_seconds=train_seconds)
        for i, acc in enumerate(test_accs, 1)])


def test_history_gives_one_list_per_metric_and_its_totals():
    h = _history([0.5, 0.7])
    assert len(h) == 2 and h.epoch == [1, 2] and h.test_acc == [0.5, 0.7]
    assert h.final.test_acc == 0.7
    assert h.total_seconds == 4.0 and h.examples_per_sec == 100.0
    assert h.summary().splitlines()[0] == "loss 0.500, train acc 0.600, test acc 0.700"
    assert [r["run"] for r in h.to_rows()] == ["run", "run"] and h.to_rows()[1]["epoch"] == 2
    with pytest.raises(AttributeError, match="no attribute 'accuracy'"):
        h.accuracy
    with pytest.raises(ValueError, match="empty"):
        History(name="x").final


def test_every_import_path_gives_the_same_classes():
    import d2lite.train  # noqa: F401  (the package attribute d2lite.train is the function)
    train_module = sys.modules["d2lite.train"]
    assert train_module.History is History and train_module.EpochStats is EpochStats
    assert d2lite.History is History


def _d2lite_imports(module: str) -> set[str]:
    """The d2lite modules that d2lite/<module>.py imports anywhere (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif (node.module or "").startswith("d2lite"):
                found.add(node.module.removeprefix("d2lite").lstrip(".") or "d2lite")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("d2lite.") for a in node.names if a.name.startswith("d2lite")}
    return found


def test_train_and_plot_meet_only_in_history():
    assert _d2lite_imports("history") == set()
    assert "history" in _d2lite_imports("train") and "plot" not in _d2lite_imports("train")
    assert "history" in _d2lite_imports("plot") and "train" not in _d2lite_imports("plot")


def test_history_runs_on_its_own_without_torch_or_the_rest_of_d2lite():
    """Executed as a lone file (so the package __init__, which imports everything, stays out of it)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('lone_history', {str(PACKAGE / 'history.py')!r})\n"
            "module = sys.modules['lone_history'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('d2lite', 'torch', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
