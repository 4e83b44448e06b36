"""One place that sizes every experiment: the book's full run, or a small one for grading."""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Budget", "FULL", "GRADING", "get_budget", "is_grading"]


@dataclass(frozen=True)
class Budget:
    """How large the experiments of a notebook or a script may be.

    ``max_epochs``, ``train_subset`` and ``test_subset`` are ``None`` for the book's full size.
    Experiments ask the budget rather than hard-coding sizes::

        budget = d2lite.get_budget()
        num_epochs = budget.epochs(10)                  # 10 for readers, fewer when graded
        train_iter, test_iter = d2lite.load_fashion_mnist(256, **budget.data_kwargs())
    """

    mode: str
    max_epochs: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None

    @property
    def grading(self) -> bool:
        return self.mode == "grading"

    def epochs(self, full: int) -> int:
        """The number of epochs to run where the book runs ``full``."""
        return full if self.max_epochs is None else min(full, self.max_epochs)

    def choose(self, full, grading):
        """``full`` under the full budget, ``grading`` under the grading one (a sweep's values, say)."""
        return grading if self.grading else full

    def data_kwargs(self) -> dict:
        """Keyword arguments for :func:`d2lite.load_fashion_mnist` (subset sizes)."""
        return {"subset": self.train_subset, "test_subset": self.test_subset}


FULL = Budget("full")
GRADING = Budget("grading", max_epochs=2, train_subset=3072, test_subset=1000)
_BUDGETS = {"full": FULL, "grading": GRADING}


def get_budget() -> Budget:
    """The budget in force: ``D2LITE_BUDGET`` (``full`` or ``grading``) if set, else grading
    while nbgrader executes a notebook (it sets ``NBGRADER_EXECUTION`` when it autogrades or
    validates), else full."""
    name = os.environ.get("D2LITE_BUDGET", "").strip().lower()
    if name:
        if name not in _BUDGETS:
            raise ValueError(
                f"D2LITE_BUDGET must be one of {sorted(_BUDGETS)}, got {os.environ['D2LITE_BUDGET']!r}"
            )
        return _BUDGETS[name]
    return GRADING if os.environ.get("NBGRADER_EXECUTION") else FULL


def is_grading() -> bool:
    """True when experiments should run at the grading size."""
    return get_budget().grading
