"""Plots of training Histories: a live plot while training (d2l's Animator) and side-by-side comparisons."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from .history import EpochStats, History

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["METRICS", "in_notebook_default", "LivePlot", "plot_histories"]

METRICS = ("train_loss", "train_acc", "test_acc")


def in_notebook_default() -> bool:
    """Whether :func:`d2lite.train.train` animates by default.

    Returns:
        True inside a Jupyter kernel, unless the budget is the grading one (graded notebooks run
        unattended, where drawing is wasted time).
    """
    from .budget import get_budget
    return _in_jupyter() and not get_budget().grading


class LivePlot:
    """A :func:`~d2lite.train.train` callback that plots a History's metrics against the epoch.

    Where the plot goes:

    * in Jupyter, one figure under the cell, redrawn in place after every epoch;
    * in a script with an interactive matplotlib backend (Qt, Tk, macOS, PyCharm's), a window,
      refreshed after every epoch and left open at the end (call ``plt.show()`` to keep it up);
    * headless (Agg: a server, CI, ``MPLBACKEND=Agg``), a PNG at ``path``, rewritten after every
      epoch; one line says where.

    Args:
        title: the plot's title; it also names the default PNG.
        num_epochs: fixes the x axis to ``[1, num_epochs]`` from the first epoch on.
        metrics: :class:`~d2lite.history.EpochStats` fields, one line each.
        path: where to write the PNG; default ``<title>.png`` (``training.png`` without a title)
            in the current directory when headless, none otherwise.
    """

    def __init__(self, title: str | None = None, num_epochs: int | None = None,
                 metrics: Sequence[str] = METRICS, path: str | Path | None = None):
        self.title, self.num_epochs, self.metrics = title, num_epochs, _check_metrics(metrics)
        self.path = Path(path) if path is not None else None
        self.mode: str | None = None  # "jupyter", "window" or "file", chosen at the first epoch
        self.figure: Figure | None = None
        self._display = None  # Jupyter's display handle

    def __call__(self, history: History) -> None:
        if self.figure is None:
            self._open()
        ax = self.figure.axes[0]
        x = history.epoch
        _draw_lines(ax, {_label(m): (x, getattr(history, m)) for m in self.metrics}, title=self.title,
                    xlim=(1, max(self.num_epochs or 1, len(x), 2)))
        if self.mode == "jupyter":
            self._show_in_jupyter()
        elif self.mode == "window":
            self.figure.canvas.draw_idle()
            self.figure.canvas.start_event_loop(0.001)
        if self.path is not None:
            _save_png(self.figure, self.path)

    def close(self) -> None:
        """End of training: the figure is left as it is, and the next run gets a new one."""
        self.figure = self._display = None

    def _open(self) -> None:
        if _in_jupyter():
            self.mode = "jupyter"
        elif _interactive_backend():
            self.mode = "window"
        else:
            self.mode = "file"
            if self.path is None:
                self.path = Path(f"{_slug(self.title or 'training')}.png")
            print(f"training plot: {self.path.resolve()} (updated every epoch)")
        # Only a window needs pyplot; elsewhere a figure pyplot doesn't know of is never shown twice.
        self.figure = _new_figure(1, figsize=(4.5, 3.2), pyplot=self.mode == "window")
        if self.mode == "window":
            self.figure.show()

    def _show_in_jupyter(self) -> None:
        # A PNG rather than the Figure: it renders whatever backend the notebook uses, and pyplot's
        # inline backend never sees the figure, so nothing is printed again when the cell ends.
        from IPython.display import Image, display
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=2 * self.figure.dpi)  # sharp on HiDPI screens
        image = Image(data=buffer.getvalue(), width=round(self.figure.get_figwidth() * self.figure.dpi))
        if self._display is None:
            self._display = display(image, display_id=True)
        else:
            self._display.update(image)


def plot_histories(histories: Iterable[History] | Mapping[str, History],
                   metrics: Sequence[str] = METRICS, path: str | Path | None = None,
                   title: str | None = None) -> Figure:
    """Compare training runs: one subplot per metric, one line per History.

    Args:
        histories: Histories (e.g. with and without batch norm), each labelled by its ``name``;
            a mapping such as ``Results.histories`` is taken by its values.
        metrics: :class:`~d2lite.history.EpochStats` fields, one subplot each.
        path: if given, the figure is also saved there as a PNG (parent folders are created).
        title: the figure's title.

    Returns:
        The Figure. In Jupyter it shows once as a cell's value; in a script with a window backend
        ``plt.show()`` shows it; headless, save it with ``path``.
    """
    histories = list(histories.values() if isinstance(histories, Mapping) else histories)
    if not histories:
        raise ValueError("plot_histories needs at least one History")
    metrics = _check_metrics(metrics)
    jupyter = _in_jupyter()
    # pyplot-managed only where pyplot must show it; in Jupyter it is closed below so that the
    # inline backend does not draw it a second time after the returned value.
    fig = _new_figure(len(metrics), figsize=(4 * len(metrics), 3.2),
                      pyplot=jupyter or _interactive_backend())
    for ax, metric in zip(fig.axes, metrics):
        _draw_lines(ax, {h.name or f"run {i}": (h.epoch, getattr(h, metric))
                         for i, h in enumerate(histories, 1)}, title=_label(metric))
    if title:
        fig.suptitle(title)
    if path is not None:
        _save_png(fig, path)
    if jupyter:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return fig


def _in_jupyter() -> bool:
    ipython = sys.modules.get("IPython")  # never imported: not in IPython, and no import cost
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None  # a kernel's shell (ZMQInteractiveShell)


def _interactive_backend() -> bool:
    import matplotlib.pyplot as plt  # resolves matplotlib's automatic backend choice
    backend = plt.get_backend().lower()
    try:
        from matplotlib.backends import BackendFilter, backend_registry
        non_interactive = backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)
    except ImportError:  # matplotlib < 3.9
        from matplotlib.rcsetup import non_interactive_bk as non_interactive
    return backend not in {b.lower() for b in non_interactive}


def _new_figure(ncols: int, figsize: tuple[float, float], pyplot: bool) -> Figure:
    if pyplot:
        import matplotlib.pyplot as plt
        fig = plt.figure(figsize=figsize)
    else:
        from matplotlib.figure import Figure
        fig = Figure(figsize=figsize)
    fig.subplots(1, ncols, squeeze=False)
    fig.set_layout_engine("constrained")
    return fig


def _draw_lines(ax: Axes, series: Mapping[str, tuple[Sequence, Sequence]], *, xlabel: str = "epoch",
                title: str | None = None, xlim: tuple[float, float] | None = None) -> None:
    """Redraw ``ax`` with one line per ``label: (x, y)`` of ``series``, with a legend."""
    ax.cla()
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
    ax.set_xlabel(xlabel)
    if xlim is not None:
        ax.set_xlim(*xlim)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _save_png(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    fields = EpochStats.__dataclass_fields__
    unknown = [m for m in metrics if m not in fields]
    if not metrics or unknown:
        raise ValueError(f"metrics must be EpochStats fields among {sorted(fields)}, got {metrics!r}")
    return metrics


def _label(metric: str) -> str:
    return metric.replace("_", " ")


def _slug(text: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", text).strip("_") or "training"
