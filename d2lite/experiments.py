"""Hyper-parameter grids: train every network under every combination of settings and tabulate the runs."""
from __future__ import annotations

import csv
import inspect
import itertools
import keyword
import math
from collections import namedtuple
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from .history import History
from .train import train

__all__ = ["grid", "run_grid", "Results", "COLUMNS"]

# The columns of every Results row, before one column per grid parameter.
COLUMNS = ("run", "network", "epoch", "loss", "train_accuracy", "accuracy", "epoch_duration",
           "run_duration")
_FORMATS = {"loss": ".4f", "train_accuracy": ".4f", "accuracy": ".4f", "epoch_duration": ".2f",
            "run_duration": ".2f"}
_DESCENDING = {"accuracy", "train_accuracy"}  # better is higher: these sort best first by default


def grid(params: Mapping[str, Iterable]) -> list[NamedTuple]:
    """Every combination of hyper-parameter values (deeplizard's ``RunBuilder.get_runs``).

    Args:
        params: name -> the values to try, e.g. ``{"lr": [0.1, 1.0], "batch_size": [128, 256]}``.

    Returns:
        One named tuple per combination, ``Run(lr=0.1, batch_size=128)``, the last name varying
        fastest: ``Run(lr=0.1, batch_size=128), Run(lr=0.1, batch_size=256), Run(lr=1.0, ...)...``.

    Raises:
        ValueError: if ``params`` is empty, a name is not a valid identifier, or a value list is
            empty or is not a list (a bare number or string).
    """
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params must be a non-empty dict of name -> values, got {params!r}")
    values = []
    for name, options in params.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) \
                or name.startswith("_"):
            raise ValueError(f"parameter names must be identifiers not starting with '_', got {name!r}")
        if isinstance(options, (str, bytes, Mapping)) or not isinstance(options, Iterable):
            raise ValueError(f"params[{name!r}] must be a list of values to try, got {options!r}")
        options = list(options)
        if not options:
            raise ValueError(f"params[{name!r}] is empty: give at least one value")
        values.append(options)
    run = namedtuple("Run", params.keys())
    return [run(*combination) for combination in itertools.product(*values)]


class Results:
    """What :func:`run_grid` measured: one row per run and epoch, and each run's History.

    Attributes:
        params: the grid's parameter names, one column each after :data:`COLUMNS`.
        rows: dicts with keys :attr:`columns`, in training order.
        histories: run label (``"lenet_bn lr=1.0 batch_size=256"``) -> History.
    """

    def __init__(self, params: Iterable[str] = ()):
        self.params = tuple(params)
        clash = set(self.params) & set(COLUMNS)
        if clash:
            raise ValueError(f"grid parameters may not be named like a column: {sorted(clash)}")
        self.rows: list[dict[str, Any]] = []
        self.histories: dict[str, History] = {}

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS + self.params

    def add(self, history: History, network: str = "", run: NamedTuple | None = None) -> str:
        """Record a finished run. Returns its label (``history.name``, made unique)."""
        settings = run._asdict() if run is not None else {}
        if set(settings) != set(self.params):
            raise ValueError(f"run {run!r} does not have the parameters {self.params}")
        label, n = history.name or network or "run", 1
        while label in self.histories:
            n += 1
            label = f"{history.name or network or 'run'} #{n}"
        self.histories[label] = history
        run_duration = 0.0
        for e in history.epochs:
            run_duration += e.seconds
            self.rows.append({"run": label, "network": network, "epoch": e.epoch, "loss": e.train_loss,
                              "train_accuracy": e.train_acc, "accuracy": e.test_acc,
                              "epoch_duration": e.seconds, "run_duration": run_duration, **settings})
        return label

    def final(self) -> list[dict[str, Any]]:
        """One row per run: its last epoch, in training order."""
        return list({row["run"]: row for row in self.rows}.values())

    def table(self, final_only: bool = True, sort_by: str | None = "accuracy",
              descending: bool | None = None) -> list[dict[str, Any]]:
        """The rows, best first.

        Args:
            final_only: only each run's last epoch (:meth:`final`), else every epoch.
            sort_by: a column, or None for training order. NaN (a diverged run) sorts last.
            descending: default True for the accuracy columns, False for the others (loss, ...).

        Returns:
            The rows (dicts), sorted; ties keep training order.
        """
        rows = self.final() if final_only else list(self.rows)
        if sort_by is None:
            return rows
        if sort_by not in self.columns:
            raise ValueError(f"sort_by must be one of {self.columns}, got {sort_by!r}")
        descending = sort_by in _DESCENDING if descending is None else descending
        missing = [r for r in rows if _is_missing(r[sort_by])]
        present = sorted((r for r in rows if not _is_missing(r[sort_by])),
                         key=lambda r: r[sort_by], reverse=descending)
        return present + missing

    def format(self, final_only: bool = True, sort_by: str | None = "accuracy",
               descending: bool | None = None) -> str:
        """:meth:`table` as fixed-width text: network, parameters, epoch and the measurements."""
        columns = ("network", *self.params, *COLUMNS[2:])
        rows = self.table(final_only, sort_by, descending)
        cells = [[_format(c, row[c]) for c in columns] for row in rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        right = [all(_is_number(row[c]) for row in rows) for c in columns]  # numbers align right
        lines = [list(columns), *cells]
        return "\n".join("  ".join(cell.rjust(w) if r else cell.ljust(w)
                                   for cell, w, r in zip(line, widths, right)).rstrip()
                         for line in lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Results({len(self.histories)} runs, {len(self.rows)} rows, params={self.params})"

    def __len__(self) -> int:
        return len(self.rows)

    def to_csv(self, path: str | Path) -> Path:
        """Write every row (all epochs, training order) as CSV, creating parent folders.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_pandas(self):
        """Every row as a ``pandas.DataFrame`` (pandas is not a dependency of d2lite)."""
        import pandas as pd
        return pd.DataFrame(self.rows, columns=list(self.columns))


def run_grid(networks: Mapping[str, Callable[[], nn.Module]], params: Mapping[str, Iterable],
             data: Callable[[NamedTuple], tuple[Iterable, Iterable]], *, num_epochs: int,
             train_kwargs: Mapping[str, Any] | None = None, out_csv: str | Path | None = None,
             verbose: bool = True, seed: int | None = None,
             train_fn: Callable[..., History] | None = None) -> Results:
    """Train every network under every combination of ``params`` (deeplizard's RunManager).

    For each run of ``grid(params)``, ``data(run)`` is called once and its iterators serve every
    network (a d2lite loader is rewound, so each network sees the same shuffles); each network is built fresh by ``networks[name]()`` and trained by ``train_fn`` with
    ``lr=run.lr``. A run whose training diverges is kept: its NaN loss sorts last.

    Args:
        networks: name -> a function building a new net, e.g. ``{"lenet": lenet, "lenet_bn": lenet_bn}``.
        params: the grid (see :func:`grid`); it must contain ``lr``. Every parameter reaches
            ``data`` through the run (``run.batch_size``); a parameter named like a keyword
            argument of ``train_fn`` (``optimizer``, say) is also passed to it.
        data: run -> ``(train_iter, test_iter)``, both iterable once per epoch (DataLoaders).
        num_epochs: epochs per run.
        train_kwargs: more keyword arguments for ``train_fn`` (``device``, ``scheduler``...); by
            default runs are trained with ``verbose=False, animate=False, progress=False``.
        out_csv: if given, the rows are written there as CSV after every run.
        verbose: print a line per run and the final table.
        seed: if given, ``torch.manual_seed(seed)`` before building each net, so that every run
            starts from the same random state.
        train_fn: the training function, :func:`d2lite.train.train` by default.

    Returns:
        The :class:`Results`.
    """
    train_fn = train_fn or train
    runs = grid(params)
    if "lr" not in params:
        raise ValueError(f"params must contain 'lr', got {list(params)}")
    if not isinstance(networks, Mapping) or not networks or not all(map(callable, networks.values())):
        raise ValueError("networks must be a non-empty dict of name -> function building a net")
    kwargs = {"verbose": False, "animate": False, "progress": False, **(train_kwargs or {})}
    reserved = {"lr", "name", "num_epochs"} & set(kwargs)
    if reserved:
        raise ValueError(f"train_kwargs may not set {sorted(reserved)}: run_grid sets them")
    keywords = {name for name, p in inspect.signature(train_fn).parameters.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    grid_kwargs = (keywords & set(params)) - {"lr"}
    if grid_kwargs & set(kwargs):
        raise ValueError(f"{sorted(grid_kwargs & set(kwargs))} are set by both params and train_kwargs")

    results = Results(params)
    total, done = len(runs) * len(networks), 0
    for run in runs:
        loaders = data(run)
        if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
            raise TypeError(f"data({run}) must return (train_iter, test_iter), got {loaders!r}")
        train_iter, test_iter = loaders
        settings = " ".join(f"{k}={_format(k, v)}" for k, v in run._asdict().items())
        first_epoch = getattr(train_iter, "epoch", None)
        for name, build in networks.items():
            if first_epoch is not None:  # every network sees the same sequence of shuffles
                train_iter.epoch = first_epoch
            if seed is not None:
                torch.manual_seed(seed)
            history = train_fn(build(), train_iter, test_iter, num_epochs, lr=run.lr,
                               name=f"{name} {settings}",
                               **{k: getattr(run, k) for k in grid_kwargs}, **kwargs)
            label = results.add(history, name, run)
            done += 1
            if out_csv is not None:
                results.to_csv(out_csv)
            if verbose and history.epochs:
                f = history.final
                print(f"[{done}/{total}] {label}: loss {f.train_loss:.3f}, train acc "
                      f"{f.train_acc:.3f}, test acc {f.test_acc:.3f} ({history.total_seconds:.1f} s)")
    if verbose:
        print(results)
        if out_csv is not None:
            print(f"rows written to {Path(out_csv).resolve()}")
    return results


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format(column: str, value) -> str:
    if column in _FORMATS and _is_number(value):
        return format(value, _FORMATS[column])
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__  # an optimizer or an init function in the grid
    return str(value)
