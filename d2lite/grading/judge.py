"""The verdicts: the checker's records (and the source policy's findings) -> each test cell's points,
the autograded notebook's outputs and the report's reasons."""
from __future__ import annotations

import json
from dataclasses import dataclass

import nbformat

from .rebuild import Rebuilt, nbgrader_meta

__all__ = ["Verdict", "read_records", "cell_events", "judge", "compose"]

MAX_TEXT = 20_000


@dataclass
class Verdict:
    passed: bool
    message: str = ""      # what the student reads: "expected X, got Y\nHint: ..." for a failure
    reason: str = ""       # a short reason for the report
    where: str = ""        # the test's own line that failed ("" for a hidden test)


def read_records(data: bytes) -> list[dict]:
    """The checker's records, one JSON object a line; a line cut short (the checker was killed) ends them."""
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        out.append(record)
    return out


def cell_events(records: list[dict]) -> tuple[dict[int, dict], list[str]]:
    """index -> the cell's end record (only cells that ended), and the checker's notes."""
    ends, notes = {}, []
    for record in records:
        if record.get("t") == "cell_end" and isinstance(record.get("index"), int):
            ends[record["index"]] = record
        elif record.get("t") == "note":
            notes.append(str(record.get("text", ""))[:300])
    return ends, notes


def _text(value, limit=MAX_TEXT) -> str:
    return str(value if value is not None else "")[:limit]


def judge(rebuilt: Rebuilt, ends: dict[int, dict], concerns: dict[int, list], stopped: str) -> dict[int, Verdict]:
    """Each test cell's verdict. A test passes only if the checker says so, and, for a structural
    test, if no finding of the source policy concerns it (``concerns``: test index -> findings)."""
    verdicts = {}
    for i, role in enumerate(rebuilt.roles):
        if role != "test":
            continue
        end = ends.get(i)
        if end is None:
            verdicts[i] = Verdict(False, f"This test did not run: {stopped}", "did not run")
        elif end.get("ok") is True:
            verdicts[i] = Verdict(True)
        else:
            message = _text(end.get("message")) or "this test failed"
            if end.get("hidden"):
                where = ""
            elif end.get("code"):
                where = f"line {end.get('line')}: {_text(end.get('code'), 300)}"
            else:
                where = ""
            verdicts[i] = Verdict(False, message, "failed: " + message.splitlines()[0][:160], where)
        if verdicts[i].passed and concerns.get(i):
            flag = concerns[i][0]
            verdicts[i] = Verdict(False, f"0 points for this check: {flag}", f"flagged ({flag.kind})", "")
    return verdicts


def compose(rebuilt: Rebuilt, ends: dict[int, dict], verdicts: dict[int, Verdict]) -> None:
    """The autograded notebook's outputs: what each cell printed, the student's own errors, and for
    each failed test its line (unless hidden) and message, never the grader's internals."""
    for i, cell in enumerate(rebuilt.nb.cells):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        end = ends.get(i) or {}
        if end.get("stdout"):
            cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=_text(end["stdout"])))
        if i in verdicts:
            v = verdicts[i]
            if not v.passed:
                head = f"Test failed at {v.where}" if v.where else "A hidden test of this cell failed"
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename="AssertionError", evalue=v.message, traceback=[head, "AssertionError: " + v.message]))
            continue
        if end and end.get("ok") is False:
            error = end.get("error") or {}
            cell.outputs.append(nbformat.v4.new_output(
                "error", ename=_text(error.get("ename", "Error"), 100), evalue=_text(error.get("evalue", "")),
                traceback=[_text(t, 300) for t in (error.get("traceback") or [])][:3]
                + [f"{_text(error.get('ename', 'Error'), 100)}: {_text(error.get('evalue', ''), 2000)}"]))


def points(rebuilt: Rebuilt, verdicts: dict[int, Verdict]) -> tuple[float, float]:
    score = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i, v in verdicts.items() if v.passed)
    most = sum(float(nbgrader_meta(rebuilt.nb.cells[i]).get("points", 0)) for i in verdicts)
    return score, most
