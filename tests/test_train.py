"""d2lite.train: d2l's training loop, its History and its printout."""
import os
import platform
import sys

import pytest
import torch
from torch import nn

import d2lite
from d2lite.train import EpochStats, History, evaluate_accuracy, train


def _blobs(n=256, seed=0, batch=64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, 2, generator=g) + 3 * y[:, None].float()
    return [(X[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_history_records_every_epoch_and_prints_d2l_lines(capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    h = train(net, _blobs(), _blobs(seed=1), 3, 0.5, device="cpu", scheduler=sched, name="mlp")
    assert len(h) == 3 and h.name == "mlp" and h.device == "cpu"
    assert h.lr == [0.5, 0.25, 0.125]
    assert [e.epoch for e in h.epochs] == [1, 2, 3]
    assert all(e.num_examples == 256 and e.examples_per_sec > 0 for e in h.epochs)
    assert h.final.test_acc > 0.9 and h.train_loss[-1] < h.train_loss[0]
    out = capsys.readouterr().out.strip().splitlines()
    f = h.final
    assert out[-2] == f"loss {f.train_loss:.3f}, train acc {f.train_acc:.3f}, test acc {f.test_acc:.3f}"
    assert out[-1].endswith("examples/sec on cpu")
    assert h.to_rows()[0]["run"] == "mlp"


def test_evaluate_accuracy_restores_mode_and_counts():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.train()
    data = [(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))]
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([1.0, 0.0]))
    assert evaluate_accuracy(net, data) == 1.0  # eval mode: dropout off, class 0 always
    assert net.training


def test_argument_errors():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="num_epochs"):
        train(net, _blobs(), _blobs(), 0, 0.1, device="cpu")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(net, _blobs(), _blobs(), 1, 0.1, device="cpu", optimizer="rmsprop")
    with pytest.raises(ValueError, match="empty"):
        History(name="x").final


def test_diverged_run_is_reported_not_raised(capsys):
    net = nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.fill_(float("nan"))
    h = train(net, _blobs(), _blobs(), 1, 0.1, device="cpu", init=None)
    assert h.train_loss[0] != h.train_loss[0]  # NaN
    assert "diverged" in capsys.readouterr().out


def test_lenet_bn_on_real_data_beats_chance_by_far():
    torch.manual_seed(0)
    train_iter, test_iter = d2lite.load_fashion_mnist(256, subset=4096, test_subset=1000, seed=0)
    h = train(d2lite.lenet(norm="d2lite"), train_iter, test_iter, 2, 1.0, device="cpu", verbose=False)
    assert h.final.test_acc > 0.6, h.test_acc  # chance is 0.1; the book's net gets ~0.7 here


def test_try_gpu_returns_a_usable_device():
    device = d2lite.try_gpu()
    assert torch.zeros(1, device=device).device.type == device.type


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("setting,expected", [({}, "True"),
                                              ({"D2LITE_KEEP_FREED_MEMORY": "0"}, "False"),
                                              ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False")])
def test_keep_freed_memory_applies_once_unless_switched_off(setting, expected):
    """In a fresh process: it applies (and again returns True), unless the variable says "0" or
    the user tuned malloc already."""
    import subprocess
    env = {k: v for k, v in os.environ.items()
           if k not in ("D2LITE_KEEP_FREED_MEMORY", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(setting)
    code = "from d2lite.train import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [expected, expected]


@pytest.fixture
def live_view(monkeypatch):
    """A fake live view installed for the test (d2lite's own, d2lite.plot.LivePlot, comes back after)."""
    train_module = sys.modules["d2lite.train"]
    monkeypatch.setattr(train_module, "_live_view", train_module._live_view)
    monkeypatch.setattr(train_module, "_animate_by_default", train_module._animate_by_default)
    made = []

    class View:
        def __init__(self, title, num_epochs):
            self.title, self.num_epochs, self.seen, self.closed = title, num_epochs, [], False
            made.append(self)

        def __call__(self, history):
            self.seen.append(len(history))

        def close(self):
            self.closed = True

    return train_module, View, made


def test_animate_adds_the_installed_live_view_to_the_callbacks(live_view):
    train_module, View, made = live_view
    train_module.set_live_view(View, lambda: False)
    seen = []
    train(nn.Linear(2, 2), _blobs(), _blobs(), 2, 0.1, device="cpu", name="mlp", animate=True,
          progress=False, verbose=False, callbacks=[lambda h: seen.append(len(h))])
    assert len(made) == 1 and (made[0].title, made[0].num_epochs) == ("mlp", 2)
    assert made[0].seen == seen == [1, 2] and made[0].closed
    train(nn.Linear(2, 2), _blobs(), _blobs(), 1, 0.1, device="cpu", verbose=False)
    assert len(made) == 1  # animate=None: the installed default said no


def test_animate_none_follows_the_installed_default(live_view):
    train_module, View, made = live_view
    train_module.set_live_view(View, lambda: True)
    train(nn.Linear(2, 2), _blobs(), _blobs(), 1, 0.1, device="cpu", progress=False, verbose=False)
    assert len(made) == 1 and made[0].title is None and made[0].seen == [1]
    train(nn.Linear(2, 2), _blobs(), _blobs(), 1, 0.1, device="cpu", animate=False, verbose=False)
    assert len(made) == 1


def test_without_a_live_view_train_never_animates_by_default_and_says_why_it_cannot(live_view):
    train_module, _, _ = live_view
    train_module.set_live_view(None)
    train(nn.Linear(2, 2), _blobs(), _blobs(), 1, 0.1, device="cpu", verbose=False)
    with pytest.raises(ValueError, match="set_live_view"):
        train(nn.Linear(2, 2), _blobs(), _blobs(), 1, 0.1, device="cpu", animate=True, verbose=False)
