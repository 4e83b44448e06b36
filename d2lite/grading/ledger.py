"""Resume: the notebooks already graded, one JSON line each in .d2lite/graded/ASSIGNMENT.jsonl,
written after the gradebook; a line is valid for the same submission, reference and caps."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

__all__ = ["VERSION", "read", "task_key", "Ledger"]

VERSION = 4  # bumped when what a grade depends on changes: older lines are graded again


def read(path: Path) -> dict[tuple[str, str], dict]:
    entries: dict[tuple[str, str], dict] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        try:
            entry = json.loads(line)
            entries[(entry["student"], entry["notebook"])] = entry
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a killed run: that notebook is graded again
    return entries


def task_key(task: dict, reference_key: str, limits) -> str:
    """What a ledger entry is valid for: the same submission, reference and caps."""
    body = json.dumps([VERSION, task, reference_key, asdict(limits)], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


class Ledger:
    """The ledger file, appended to one flushed line at a time."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def add(self, student: str, notebook: str, key: str, row) -> None:
        self.file.write(json.dumps({"student": student, "notebook": notebook, "key": key, "row": asdict(row)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
