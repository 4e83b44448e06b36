"""The table and CSV an instructor reads: per student and notebook, score, time, memory, reasons."""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Row", "format_table", "write_csv"]


@dataclass
class Row:
    student: str
    notebook: str
    score: float
    max_score: float
    seconds: float = 0.0
    peak_mib: float = 0.0
    reasons: list[str] = field(default_factory=list)
    graded: bool = True            # False: an internal error; nothing of it is in the gradebook

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def format_table(rows: list[Row]) -> str:
    header = f"{'student':<16} {'notebook':<26} {'score':>11} {'seconds':>8} {'peak MiB':>9}  reasons"
    lines = [header, "-" * len(header)]
    for r in rows:
        score = f"{r.score:g}/{r.max_score:g}" if r.graded else "NOT GRADED"
        lines.append(f"{r.student[:16]:<16} {r.notebook[:26]:<26} {score:>11} {r.seconds:8.1f} "
                     f"{r.peak_mib:9.0f}  {r.reason[:300]}")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["student", "notebook", "score", "max_score", "seconds", "peak_mib", "reasons",
                                     "graded"])
        writer.writeheader()
        for r in rows:
            row = asdict(r)
            row["reasons"] = r.reason
            if not r.graded:
                row["score"] = ""  # no score: the notebook was not graded
            writer.writerow(row)
    return path
