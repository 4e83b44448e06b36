"""Shared test set-up: the offline data copy, a headless matplotlib, the full budget."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SHARED = ROOT.parent / "shared" / "data"
if not os.environ.get("D2LITE_DATA") and (_SHARED / "FashionMNIST").is_dir():
    os.environ["D2LITE_DATA"] = str(_SHARED)
elif os.environ.get("D2LITE_DATA"):
    os.environ["D2LITE_DATA"] = str(Path(os.environ["D2LITE_DATA"]).resolve())
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _no_ambient_budget(monkeypatch):
    """Tests choose their budget explicitly; nothing leaks in from the environment."""
    monkeypatch.delenv("D2LITE_BUDGET", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
