"""The verdict, taken in the trusted process: the student's records against the reference's, and
the checks of the student's source."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .probes import decode

__all__ = ["Verdict", "cell_events", "judge_cell", "forbidden_ops"]


@dataclass
class Verdict:
    passed: bool
    message: str = ""      # "expected X, got Y\nHint: ..." for a failure
    reason: str = ""       # a short reason for the report


def cell_events(records) -> dict[int, dict]:
    """index -> {"records": [...], "end": the cell_end record or None} for one run's records."""
    cells: dict[int, dict] = {}
    current = None
    for record in records:
        kind = record.get("t")
        if kind == "cell_start" and isinstance(record.get("index"), int):
            current = cells.setdefault(record["index"], {"records": [], "end": None})
        elif kind == "cell_end" and current is not None:
            current["end"] = record
            current = None
        elif current is not None and kind in ("close", "assert", "assert_msg", "trace"):
            current["records"].append(record)
    return cells


def forbidden_ops(ops, structure: set[str]) -> list[str]:
    keys = {k for k in ("batch_norm", "layer_norm", "group_norm") if any(k in s for s in structure)}
    if any("instance_norm" in s for s in structure):
        keys.add("batch_norm")  # instance norm dispatches to native_batch_norm
    return sorted(op for op in ops if isinstance(op, str) and any(k in op for k in keys))


def _close(student: dict, reference: dict) -> str | None:
    from d2lite.checks import assert_close

    try:
        actual = decode(student.get("actual"))
        expected = decode(reference.get("expected"))
    except (ValueError, TypeError) as error:
        return f"{reference.get('what', 'the result')}: the value could not be read ({error})"
    if isinstance(actual, dict):
        return f"{reference.get('what', 'the result')}: expected a tensor, got {actual.get('unencodable', 'something else')}"
    rtol, atol = reference.get("rtol"), reference.get("atol")
    try:
        assert_close(actual, expected, reference.get("what") or "the result", rtol=rtol, atol=atol,
                     hint=reference.get("hint"))
    except AssertionError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 — a value assert_close cannot take
        return f"{reference.get('what', 'the result')}: {type(error).__name__}: {error}"
    return None


def judge_cell(student: dict | None, reference: dict, structure: set[str]) -> Verdict:
    """One test cell: every check the reference ran must run again and hold on the student's values,
    every assert must hold, the cell must end without error, and no forbidden op may be dispatched."""
    if student is None or student.get("end") is None:
        return Verdict(False, "The notebook stopped before this test cell finished (it timed out, ran "
                              "out of memory, exited or crashed in an earlier cell).", "did not run")
    refs = defaultdict(list)
    for record in reference["records"]:
        if record["t"] == "close":
            refs[record["site"]].append(record)
    seen = defaultdict(int)
    records = student["records"]
    for i, record in enumerate(records):
        kind = record.get("t")
        if kind == "trace":
            bad = forbidden_ops(record.get("ops", []), structure)
            if bad:
                return Verdict(False, f"your code ran {', '.join('aten.' + b for b in bad)}: implement the "
                                      "computation yourself with tensor operations (mean, var, sqrt, ...)",
                               "library op dispatched: " + ", ".join(bad))
        elif kind == "close":
            site = record.get("site")
            k = seen[site]
            seen[site] += 1
            if k >= len(refs.get(site, [])):
                return Verdict(False, f"{record.get('what', 'a check')}: this check ran more often than for the "
                                      "reference solution, so its expected value is unknown",
                               "check ran off the reference path")
            problem = _close(record, refs[site][k])
            if problem:
                return Verdict(False, problem, "wrong value")
        elif kind == "assert" and record.get("ok") is not True:
            msg = next((r.get("msg") for r in records[i + 1:i + 2] if r.get("t") == "assert_msg"), None)
            return Verdict(False, msg or "an assertion of this test failed", "assertion failed")
    end = student["end"]
    if not end.get("ok"):
        error = end.get("error") or {}
        return Verdict(False, f"{error.get('ename', 'Error')}: {error.get('evalue', '')}".strip(),
                       f"raised {error.get('ename', 'an error')}")
    for site, expected in refs.items():
        if seen[site] < len(expected):
            return Verdict(False, f"{expected[seen[site]].get('what', 'a check')}: this check did not run "
                                  f"({seen[site]} of {len(expected)} times)", "check skipped")
    return Verdict(True)
