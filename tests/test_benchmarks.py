"""The benchmark scripts run and write their tables (tiny settings; their timings are not checked).

`make bench` is run by hand, so nothing else would notice a script that no longer runs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, check=True).stdout


def test_bench_batch_norm_writes_the_table(tmp_path):
    out = _run("bench_batch_norm.py", "--seconds", "0.01", "--min-rounds", "1", "--max-rounds",
               "1", "--device", "cpu", "--out", str(tmp_path))
    table = (tmp_path / "batch_norm.md").read_text()
    for shape in ("(256, 6, 24, 24)", "(256, 16, 8, 8)", "(256, 120)", "(128, 64, 56, 56)"):
        assert shape in table and shape in out
    assert "Copy bandwidth" in table


def test_bench_end_to_end_runs_every_pipeline(tmp_path):
    _run("bench_end_to_end.py", "--epochs", "1", "--subset", "512", "--out", str(tmp_path))
    results = json.loads((tmp_path / "end_to_end_quick.json").read_text())["results"]
    assert [r["pipeline"] for r in results] == ["d2l", "d2l-concise", "d2lite", "d2lite-torch"]
    assert all(0 <= r["test_acc"] <= 1 and r["wall_s"] > 0 for r in results)
    assert "wall-time speed-up vs d2l" in (tmp_path / "end_to_end_quick.md").read_text()


def test_profile_step_times_every_layer_of_both_networks(tmp_path):
    _run("profile_step.py", "--steps", "2", "--rounds", "1", "--out", str(tmp_path))
    results = json.loads((tmp_path / "step_profile.json").read_text())["results"]
    assert [r["name"] for r in results] == ["d2l", "d2lite"]
    for r in results:
        assert len(r["layers"]) == len(r["forward_ms"]) == len(r["backward_ms"]) == 16
        assert all(t >= 0 for t in r["forward_ms"] + r["backward_ms"])
        assert r["forward_ms"][0] > 0 and r["backward_ms"][0] > 0  # conv1
    assert "conv1" in (tmp_path / "step_profile.md").read_text()


def test_bench_sync_batch_norm_times_every_shape_on_two_ranks(tmp_path):
    out = _run("bench_sync_batch_norm.py", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path),
               "--json", str(tmp_path / "sbn.json"))
    table = (tmp_path / "sync_batch_norm.md").read_text()
    for shape in ("(128, 6, 24, 24)", "(128, 16, 8, 8)", "(128, 120)", "(4, 6, 24, 24)"):
        assert shape in table and shape in out
    assert "comm / sync" in table and "--repeats 2" in table
    result = json.loads((tmp_path / "sbn.json").read_text())
    assert result["processes"] == 2 and len(result["results"]) == 4
    for row in result["results"]:
        assert len(row["ms_per_rank"]) == 2
        assert all(row["ms"][k] > 0 for k in ("local", "sync", "comm"))
