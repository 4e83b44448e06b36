"""Tests of d2lite.experiments: grids, Results, and run_grid with a fake and the real train."""
import csv
import math

import pytest
import torch
from torch import nn

from d2lite.experiments import COLUMNS, Results, grid, run_grid
from d2lite.train import EpochStats, History


def test_grid_is_the_cartesian_product_last_parameter_fastest():
    runs = grid({"lr": [0.1, 1.0], "batch_size": (128, 256, 512)})
    assert len(runs) == 6
    assert runs[0]._fields == ("lr", "batch_size")
    assert [tuple(r) for r in runs] == [(0.1, 128), (0.1, 256), (0.1, 512),
                                        (1.0, 128), (1.0, 256), (1.0, 512)]
    assert runs[4].lr == 1.0 and runs[4].batch_size == 256
    assert repr(runs[0]) == "Run(lr=0.1, batch_size=128)"
    assert grid({"lr": range(3)})[2] == (2,)


@pytest.mark.parametrize("params, message", [
    ({}, "non-empty dict"),
    ([("lr", [0.1])], "non-empty dict"),
    ({"lr": []}, "empty"),
    ({"lr": 0.1}, "list of values"),
    ({"optimizer": "sgd"}, "list of values"),
    ({1: [0.1]}, "identifiers"),
    ({"batch size": [1]}, "identifiers"),
    ({"class": [1]}, "identifiers"),
])
def test_grid_rejects_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        grid(params)


def crafted_history(name: str, test_accs: list[float], loss: float = 0.5,
                    seconds: float = 2.0) -> History:
    return History(name=name, epochs=[
        EpochStats(epoch=i, train_loss=loss / i, train_acc=acc - 0.05, test_acc=acc, lr=0.1,
                   examples_per_sec=100.0, seconds=seconds * i)
        for i, acc in enumerate(test_accs, 1)])


# test accuracies per epoch that the fake train_fn returns, by (network, lr, batch_size)
CRAFTED = {("a", 0.1, 8): [0.5, 0.6], ("a", 10.0, 8): [0.1, math.nan],
           ("b", 0.1, 8): [0.7, 0.9], ("b", 10.0, 8): [0.3, 0.2]}


class FakeTrain:
    """Stands for d2lite.train.train: records its calls and returns CRAFTED Histories."""

    def __init__(self):
        self.calls = []

    def __call__(self, net, train_iter, test_iter, num_epochs, lr, device=None, *,
                 optimizer="sgd", name="", verbose=True, animate=None, progress=None):
        self.calls.append(dict(net=net, data=(train_iter, test_iter), num_epochs=num_epochs, lr=lr,
                               optimizer=optimizer, name=name, verbose=verbose, animate=animate,
                               progress=progress, device=device))
        accs = CRAFTED[(net.network, lr, train_iter["batch_size"])]
        loss = math.nan if lr == 10.0 and net.network == "a" else 0.5
        return crafted_history(name, accs[:num_epochs], loss=loss)


def fake_net(network: str):
    def build():
        net = nn.Identity()
        net.network = network
        return net
    return build


def fake_data(run):
    return {"batch_size": run.batch_size}, {"test": True}


def run_fake_grid(tmp_path, **kwargs):
    train = FakeTrain()
    results = run_grid({"a": fake_net("a"), "b": fake_net("b")}, {"lr": [0.1, 10.0], "batch_size": [8]},
                       fake_data, num_epochs=2, train_fn=train, **kwargs)
    return train, results


def test_run_grid_trains_every_network_under_every_run(tmp_path, capsys):
    train, results = run_fake_grid(tmp_path, verbose=False)
    assert [c["name"] for c in train.calls] == [
        "a lr=0.1 batch_size=8", "b lr=0.1 batch_size=8", "a lr=10.0 batch_size=8",
        "b lr=10.0 batch_size=8"]
    assert all(c["verbose"] is False and c["animate"] is False and c["progress"] is False
               for c in train.calls)
    assert all(c["num_epochs"] == 2 and c["data"][1] == {"test": True} for c in train.calls)
    assert len({id(c["net"]) for c in train.calls}) == 4  # a fresh net for every run
    assert capsys.readouterr().out == ""

    assert results.columns == COLUMNS + ("lr", "batch_size")
    assert len(results) == len(results.rows) == 8
    assert list(results.histories) == [c["name"] for c in train.calls]
    row = results.rows[1]
    assert row == {"run": "a lr=0.1 batch_size=8", "network": "a", "epoch": 2, "loss": 0.25,
                   "train_accuracy": pytest.approx(0.55), "accuracy": 0.6, "epoch_duration": 4.0,
                   "run_duration": 6.0, "lr": 0.1, "batch_size": 8}
    assert [r["run_duration"] for r in results.rows[:2]] == [2.0, 6.0]  # cumulative


def test_results_table_sorts_by_accuracy_with_the_diverged_run_last(tmp_path):
    _, results = run_fake_grid(tmp_path, verbose=False)
    final = results.final()
    assert [r["epoch"] for r in final] == [2, 2, 2, 2]
    table = results.table()
    assert [(r["network"], r["lr"]) for r in table] == [("b", 0.1), ("a", 0.1), ("b", 10.0), ("a", 10.0)]
    assert math.isnan(table[-1]["accuracy"]) and math.isnan(table[-1]["loss"])
    assert [r["loss"] for r in results.table(sort_by="loss")][:3] == [0.25, 0.25, 0.25]
    assert [r["accuracy"] for r in results.table(final_only=False)][:3] == [0.9, 0.7, 0.6]
    assert [r["run"] for r in results.table(sort_by=None)] == [r["run"] for r in final]
    with pytest.raises(ValueError, match="sort_by"):
        results.table(sort_by="acc")


def test_results_format_is_a_fixed_width_table(tmp_path):
    _, results = run_fake_grid(tmp_path, verbose=False)
    lines = str(results).splitlines()
    assert lines[0].split() == ["network", "lr", "batch_size", "epoch", "loss", "train_accuracy",
                                "accuracy", "epoch_duration", "run_duration"]
    assert len(lines) == 5
    assert lines[1].split() == ["b", "0.1", "8", "2", "0.2500", "0.8500", "0.9000", "4.00", "6.00"]
    assert "nan" in lines[-1] and lines[-1].startswith("a")
    assert len(results.format(final_only=False).splitlines()) == 9
    end_of_accuracy = lines[0].index("accuracy ") + len("accuracy")
    assert all(line[end_of_accuracy - 1] in "0n" for line in lines[1:])  # numbers right-aligned
    assert "4 runs" in repr(results)


def test_run_grid_writes_csv_that_reads_back(tmp_path, capsys):
    path = tmp_path / "out" / "grid.csv"
    _, results = run_fake_grid(tmp_path, out_csv=path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and list(rows[0]) == list(results.columns)
    for read, row in zip(rows, results.rows):
        assert read["run"] == row["run"] and int(read["epoch"]) == row["epoch"]
        for column in ("loss", "accuracy", "run_duration", "lr"):
            assert float(read[column]) == row[column] or math.isnan(row[column])
    out = capsys.readouterr().out
    assert out.count("[") == 4 and "[4/4] b lr=10.0 batch_size=8" in out  # one line per run
    assert str(results) in out and str(path) in out


def test_run_grid_passes_grid_keys_that_train_takes_and_validates(tmp_path):
    train = FakeTrain()
    results = run_grid({"a": fake_net("a")}, {"lr": [0.1], "batch_size": [8], "optimizer": ["adam"]},
                       fake_data, num_epochs=1, train_fn=train, verbose=False,
                       train_kwargs={"device": "cpu", "progress": True})
    assert train.calls[0]["optimizer"] == "adam" and train.calls[0]["device"] == "cpu"
    assert train.calls[0]["progress"] is True
    assert results.rows[0]["optimizer"] == "adam"

    networks = {"a": fake_net("a")}
    with pytest.raises(ValueError, match="'lr'"):
        run_grid(networks, {"batch_size": [8]}, fake_data, num_epochs=1, train_fn=train)
    with pytest.raises(ValueError, match="train_kwargs"):
        run_grid(networks, {"lr": [0.1], "batch_size": [8]}, fake_data, num_epochs=1,
                 train_fn=train, train_kwargs={"name": "x"})
    with pytest.raises(ValueError, match="both"):
        run_grid(networks, {"lr": [0.1], "optimizer": ["sgd"]}, fake_data, num_epochs=1,
                 train_fn=train, train_kwargs={"optimizer": "adam"})
    with pytest.raises(ValueError, match="column"):
        run_grid(networks, {"lr": [0.1], "epoch": [1]}, fake_data, num_epochs=1, train_fn=train)
    with pytest.raises(ValueError, match="networks"):
        run_grid({}, {"lr": [0.1]}, fake_data, num_epochs=1, train_fn=train)
    with pytest.raises(TypeError, match="train_iter, test_iter"):
        run_grid(networks, {"lr": [0.1]}, lambda run: [1, 2, 3], num_epochs=1, train_fn=train)


def test_results_labels_stay_unique():
    results = Results()
    assert results.add(crafted_history("x", [0.5])) == "x"
    assert results.add(crafted_history("x", [0.6])) == "x #2"
    assert list(results.histories) == ["x", "x #2"] and len(results.final()) == 2


def separable_data(run, n=256, seed=0):
    """Two Gaussian blobs in 4-d, shuffled into batches of run.batch_size."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, 4, generator=g) * 0.5 + (y.float() * 2 - 1).unsqueeze(1) * 1.5
    batches = [(X[i:i + run.batch_size], y[i:i + run.batch_size]) for i in range(0, n, run.batch_size)]
    return batches[: len(batches) * 3 // 4], batches[len(batches) * 3 // 4:]


def test_run_grid_with_the_real_train(tmp_path, capsys):
    networks = {"mlp": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                "mlp_bn": lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                                nn.Linear(8, 2))}
    results = run_grid(networks, {"lr": [0.1, 0.5], "batch_size": [16, 32]}, separable_data,
                       num_epochs=3, train_kwargs={"device": "cpu"}, seed=0,
                       out_csv=tmp_path / "grid.csv")
    assert len(results.rows) == 2 * 2 * 2 * 3 and len(results.final()) == 8
    assert len(str(results).splitlines()) == 1 + 8
    best = results.table()[0]
    assert best["accuracy"] > 0.95
    assert all(r["accuracy"] > 0.8 for r in results.final())
    for history in results.histories.values():
        assert history.train_loss[-1] < history.train_loss[0]
    out = capsys.readouterr().out
    assert out.count("test acc") == 8 and "<Figure" not in out
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]  # never animated


def test_run_grid_seed_gives_every_run_the_same_initial_weights():
    def weights_of_runs(seed):
        weights = []

        def train_fn(net, train_iter, test_iter, num_epochs, lr, name="", **kwargs):
            weights.append(net.weight.detach().clone())
            return crafted_history(name, [0.5])
        run_grid({"a": lambda: nn.Linear(3, 2), "b": lambda: nn.Linear(3, 2)}, {"lr": [0.1, 0.2]},
                 lambda run: ([], []), num_epochs=1, train_fn=train_fn, verbose=False, seed=seed)
        return weights

    seeded = weights_of_runs(seed=3)
    assert len(seeded) == 4 and all(torch.equal(w, seeded[0]) for w in seeded)
    unseeded = weights_of_runs(seed=None)
    assert not torch.equal(unseeded[0], unseeded[1])


def test_run_grid_gives_every_network_the_same_shuffles():
    from d2lite.data import TensorLoader
    from d2lite.experiments import run_grid
    from d2lite.train import EpochStats, History

    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1)
    loader = TensorLoader(images, torch.zeros(64, dtype=torch.long), 8, shuffle=True, seed=3)
    seen = {}

    def fake_train(net, train_iter, test_iter, num_epochs, lr, name="", **kwargs):
        seen[name] = [X.flatten().tolist() for _ in range(num_epochs) for X, _ in train_iter]
        stats = EpochStats(1, 1.0, 0.5, 0.5, lr, 1.0, 1.0)
        return History(name=name, epochs=[stats])

    run_grid({"a": torch.nn.Identity, "b": torch.nn.Identity}, {"lr": [0.1]},
             lambda run: (loader, loader), num_epochs=2, verbose=False, train_fn=fake_train)
    first, second = seen.values()
    assert first == second and first[0] != first[len(first) // 2]  # same epochs, reshuffled
