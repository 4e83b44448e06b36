"""Tests of d2lite.plot, headless (Agg) and with a fake Jupyter kernel."""
import math
import types

import matplotlib
import pytest

matplotlib.use("Agg")

from d2lite import plot  # noqa: E402
from d2lite.train import EpochStats, History  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_history(name: str, losses: list[float], test_accs: list[float]) -> History:
    return History(name=name, epochs=[
        EpochStats(epoch=i, train_loss=loss, train_acc=0.5 + 0.1 * i, test_acc=acc, lr=0.1,
                   examples_per_sec=1000.0, seconds=1.0)
        for i, (loss, acc) in enumerate(zip(losses, test_accs), 1)])


@pytest.fixture(autouse=True)
def headless(monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("D2LITE_BUDGET", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_kernel(monkeypatch):
    """Pretend to run in a Jupyter kernel: IPython's get_ipython() returns a shell with a kernel."""
    import IPython
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)


def test_plot_histories_draws_one_axis_per_metric_one_line_per_history(tmp_path):
    bn = make_history("with bn", [1.0, 0.5, 0.3], [0.6, 0.7, 0.8])
    plain = make_history("without bn", [2.0, 1.5], [0.3, 0.4])
    path = tmp_path / "out" / "compare.png"
    fig = plot.plot_histories([bn, plain], path=path, title="batch norm")

    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 1000
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "train acc", "test acc"]
    for ax, metric in zip(fig.axes, plot.METRICS):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["with bn", "without bn"]
        assert list(lines[0].get_ydata()) == getattr(bn, metric)
        assert list(lines[1].get_xdata()) == [1, 2]
        assert list(lines[1].get_ydata()) == getattr(plain, metric)
    assert fig._suptitle.get_text() == "batch norm"


def test_plot_histories_takes_a_mapping_and_chosen_metrics_and_survives_nan():
    diverged = make_history("diverged", [1.0, math.nan, math.inf], [0.5, 0.1, 0.1])
    fig = plot.plot_histories({"x": diverged}, metrics=["test_acc"])
    assert len(fig.axes) == 1
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["diverged"]
    fig.canvas.draw()  # rendering NaN and inf must not raise


def test_plot_histories_rejects_unknown_metrics_and_no_histories():
    with pytest.raises(ValueError, match="EpochStats fields"):
        plot.plot_histories([make_history("a", [1.0], [0.5])], metrics=["accuracy"])
    with pytest.raises(ValueError, match="at least one"):
        plot.plot_histories([])


def test_liveplot_headless_writes_a_png_and_never_prints_a_figure(tmp_path, capsys):
    live = plot.LivePlot(title="lenet bn", num_epochs=5)
    history = make_history("lenet bn", [], [])
    full = make_history("lenet bn", [1.0, 0.8, 0.6], [0.5, 0.6, 0.7])
    for epoch in full.epochs:
        history.epochs.append(epoch)
        live(history)
    assert [list(line.get_ydata()) for line in live.figure.axes[0].get_lines()] == [
        full.train_loss, full.train_acc, full.test_acc]
    assert live.figure.axes[0].get_xlim() == (1, 5)
    live.close()

    png = tmp_path / "lenet_bn.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    out = capsys.readouterr().out
    assert "<Figure" not in out
    assert out.count("\n") == 1 and str(png) in out


def test_liveplot_writes_to_the_given_path(tmp_path, capsys):
    path = tmp_path / "plots" / "run.png"
    live = plot.LivePlot(path=path, metrics=("test_acc",))
    live(make_history("", [1.0], [0.5]))
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert str(path) in capsys.readouterr().out


def test_liveplot_in_jupyter_updates_one_display_in_place(fake_kernel, monkeypatch, tmp_path, capsys):
    import IPython.display
    calls = []

    class Handle:
        def update(self, obj):
            calls.append(("update", obj))

    def display(obj, display_id=False):
        calls.append(("display", obj))
        assert display_id is True
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    live = plot.LivePlot(title="t", num_epochs=3)
    history = make_history("t", [1.0, 0.5, 0.2], [0.5, 0.6, 0.7])
    for n in range(1, 4):
        live(History(name="t", epochs=history.epochs[:n]))
    live.close()

    assert [kind for kind, _ in calls] == ["display", "update", "update"]
    assert all(image.data.startswith(PNG_MAGIC) for _, image in calls)
    assert capsys.readouterr().out == ""
    assert not list(tmp_path.iterdir())  # no PNG file unless a path is given
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # pyplot never held the figure: Jupyter can't show it twice


@pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive")  # Agg can't open windows
def test_liveplot_with_a_window_backend_refreshes_a_pyplot_figure(monkeypatch, tmp_path, capsys):
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plot, "_interactive_backend", lambda: True)
    live = plot.LivePlot(num_epochs=2)
    live(make_history("", [1.0], [0.5]))
    try:
        assert plt.fignum_exists(live.figure.number)
        assert capsys.readouterr().out == ""
        assert not list(tmp_path.iterdir())
    finally:
        plt.close(live.figure)


def test_in_notebook_default(fake_kernel, monkeypatch):
    assert plot.in_notebook_default() is True
    monkeypatch.setenv("D2LITE_BUDGET", "grading")
    assert plot.in_notebook_default() is False


def test_in_notebook_default_is_false_outside_jupyter():
    assert plot.in_notebook_default() is False


def test_importing_d2lite_installs_liveplot_as_trains_live_view(fake_kernel, monkeypatch, capsys):
    """d2lite.train() in Jupyter animates with a LivePlot by default, though train.py never imports plot."""
    import IPython.display
    import torch
    from torch import nn

    import d2lite
    shown = []

    class Handle:
        def update(self, obj):
            shown.append("update")

    def display(obj, display_id=False):
        shown.append("display")
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
    d2lite.train(nn.Linear(2, 2), data, data, 2, 0.1, device="cpu", progress=False, verbose=False)
    assert shown == ["display", "update"]
    monkeypatch.setenv("D2LITE_BUDGET", "grading")  # graded notebooks are never animated
    d2lite.train(nn.Linear(2, 2), data, data, 1, 0.1, device="cpu", progress=False, verbose=False)
    assert shown == ["display", "update"]
