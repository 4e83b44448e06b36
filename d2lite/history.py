"""The record of a training run: one EpochStats per epoch, gathered in a History."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["EpochStats", "History"]


@dataclass
class EpochStats:
    """What one epoch of :func:`d2lite.train.train` measured."""

    epoch: int                # 1-based
    train_loss: float         # mean cross-entropy over the epoch's training examples
    train_acc: float          # accuracy on those examples, measured while training
    test_acc: float           # accuracy on the test iterator after the epoch
    lr: float                 # learning rate used during the epoch
    examples_per_sec: float   # training examples / seconds in training steps (d2l's timer)
    seconds: float            # wall time of the epoch, data and evaluation included
    num_examples: int = 0     # training examples seen in the epoch
    train_seconds: float = 0  # seconds spent in training steps


@dataclass
class History:
    """Per-epoch statistics of one training run; ``history.test_acc`` etc. give one list each."""

    name: str = ""
    device: str = "cpu"
    epochs: list[EpochStats] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getattr__(self, metric: str) -> list:
        if metric in EpochStats.__dataclass_fields__:
            return [getattr(e, metric) for e in self.epochs]
        raise AttributeError(f"{type(self).__name__} has no attribute {metric!r}")

    @property
    def final(self) -> EpochStats:
        if not self.epochs:
            raise ValueError(f"history {self.name!r} is empty: no epoch has been trained")
        return self.epochs[-1]

    @property
    def total_seconds(self) -> float:
        """Wall time of the whole run."""
        return sum(e.seconds for e in self.epochs)

    @property
    def examples_per_sec(self) -> float:
        """Training examples per second over the run, training steps only (d2l's figure)."""
        seconds = sum(e.train_seconds for e in self.epochs)
        return sum(e.num_examples for e in self.epochs) / seconds if seconds else 0.0

    def summary(self) -> str:
        """d2l's closing lines: ``loss …, train acc …, test acc …`` and ``… examples/sec on …``."""
        f = self.final
        return (f"loss {f.train_loss:.3f}, train acc {f.train_acc:.3f}, test acc {f.test_acc:.3f}\n"
                f"{self.examples_per_sec:.1f} examples/sec on {self.device}")

    def to_rows(self) -> list[dict]:
        """One dict per epoch, with the run's name, for tables and CSV."""
        return [{"run": self.name, **asdict(e)} for e in self.epochs]
