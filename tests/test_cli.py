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


@pytest.mark.parametrize("extra, bn, closing", [
    ([], "sync", "(2 processes, synchronized batch norm)"),
    (["--local-bn"], "local", "(2 processes, local batch norm)"),
])
def test_compare_on_two_processes_writes_its_results(extra, bn, closing, tmp_path, capsys):
    assert main(["compare", "--nets", "lenet_bn", "--epochs", "1", "--subset", "1024",
                 "--test-subset", "200", "--out", str(tmp_path), "--processes", "2",
                 *extra]) == 0
    out = capsys.readouterr().out
    assert "== lenet_bn: lr 1.0, batch size 256 (128 a process)" in out
    assert out.count(closing) == 1 and out.count(", test acc ") == 1
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["network"], r["processes"], r["batch_norm"]) for r in rows] == [("lenet_bn", "2", bn)]
    assert 0 <= float(rows[0]["accuracy"]) <= 1 and float(rows[0]["loss"]) > 0
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_one_process_keeps_the_table_of_before(tmp_path, capsys):
    main(["compare", "--nets", "lenet_bn", "--epochs", "1", "--subset", "512", "--test-subset",
          "100", "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    header = (tmp_path / "compare.csv").read_text().splitlines()[0]
    assert header == ("run,network,epoch,loss,train_accuracy,accuracy,epoch_duration,"
                      "run_duration,lr,batch_size")
    out = capsys.readouterr().out
    assert "== lenet_bn: lr 1.0, batch size 256, 1 epochs on cpu\n" in out
    assert "batch norm)" not in out and "a process" not in out


@pytest.mark.parametrize("argv, message", [
    (["--local-bn"], "--local-bn needs --processes 2 or more"),
    (["--processes", "2", "--device", "cuda"], "trains on CPU processes"),
    (["--processes", "4", "--batch-size", "3"], "each process needs at least 1 example"),
    (["--processes", "2", "--local-bn", "--batch-size", "3"], "batch size >= 4"),
    (["--processes", "2", "--local-bn", "--batch-size", "256", "--subset", "513"],
     "the last batch of an epoch has 1 of the 513"),
])
def test_bad_process_options_exit_with_a_message(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["compare", "--nets", "lenet_bn", "--epochs", "1", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_non_positive_processes_rejected_by_the_parser(value, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--processes", value])
    assert "expected a positive integer" in capsys.readouterr().err
