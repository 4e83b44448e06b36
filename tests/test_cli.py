"""The ``d2lite compare`` command behind ``make demo``, on a small slice of the real data."""
import csv

import pytest

from d2lite.cli import main


def test_compare_prints_both_runs_and_writes_table_and_plot(tmp_path, capsys):
    assert main(["compare", "--epochs", "1", "--subset", "2048", "--test-subset", "500",
                 "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "== lenet: lr 0.9" in out and "== lenet_bn: lr 1.0" in out
    assert out.count("examples/sec on cpu") == 2 and out.count(", test acc ") == 2
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert sorted(r["network"] for r in rows) == ["lenet", "lenet_bn"]
    assert {r["lr"] for r in rows} == {"0.9", "1.0"}
    assert (tmp_path / "compare.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["compare", "--nets", "resnet"], "unknown"),
    (["compare", "--lr", "fast"], "--lr takes VALUE"),
    (["compare", "--lr", "lenet_bn=0"], "must be positive"),
    (["compare", "--nets", "lenet", "--lr", "lenet_bn=1"], "not among --nets"),
])
def test_bad_arguments_exit_with_a_message(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(argv + ["--out", str(tmp_path)])


def test_non_positive_epochs_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--epochs", "0"])
    assert "expected a positive integer" in capsys.readouterr().err
