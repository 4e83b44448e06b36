"""Inside the sandbox: run one rebuilt notebook's cells in an IPython shell and write the probes' records.

Runs in a fresh fork of the warm server (zygote.py), as `nobody`. Reads the job (JSON: the cells and
the submission's own files) from stdin and writes one JSON line per event to the file descriptor named by $D2LITE_RECORDS_FD: ``cell_start``,
the probes' records, ``cell_end`` (ok, the error, the cell's captured output), ``done``. Nothing
here is trusted by the grader: it only carries data out.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import traceback

MAX_CELL_OUTPUT = 20_000


class _Capped(io.TextIOBase):
    def __init__(self, limit: int) -> None:
        self.parts, self.size, self.limit, self.dropped = [], 0, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def value(self) -> str:
        out = "".join(self.parts)
        return out + (f"\n… {self.dropped} more characters not shown" if self.dropped else "")


def main() -> int:
    out = os.fdopen(int(os.environ.pop("D2LITE_RECORDS_FD")), "w", buffering=1)
    def emit(record: dict) -> None:
        out.write(json.dumps(record, allow_nan=True) + "\n")

    job = json.loads(sys.stdin.read())
    sys.stdin = open(os.devnull)
    for rel, data in job.get("files", {}).items():
        path = os.path.normpath(rel)
        if path.startswith(("/", "..")):  # the grader sends relative paths only; never write outside home
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))
    sys.path.append(os.getcwd())  # the student's own modules, after the library's

    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    torch.set_flush_denormal(True)
    import matplotlib

    matplotlib.use("Agg")
    import d2lite  # noqa: F401  (imported before any student code: a shadowing d2lite.py is not loaded)
    from IPython.core.interactiveshell import InteractiveShell

    from d2lite.grading.probes import PROBE, Probe

    shell = InteractiveShell.instance(colors="NoColor")
    shell.user_ns[PROBE] = Probe(emit, shell.user_ns)
    real_stdout, real_stderr = sys.stdout, sys.stderr
    for cell in job["cells"]:
        emit({"t": "cell_start", "index": cell["index"]})
        stdout, stderr = _Capped(MAX_CELL_OUTPUT), _Capped(MAX_CELL_OUTPUT)
        sys.stdout, sys.stderr = stdout, stderr
        error = None
        try:
            result = shell.run_cell(cell["source"], store_history=False, silent=False)
            exc = result.error_before_exec or result.error_in_exec
            if exc is not None:
                error = {"ename": type(exc).__name__, "evalue": str(exc)[:MAX_CELL_OUTPUT],
                         "traceback": traceback.format_exception(exc)[-3:]}
        except BaseException as exc:  # noqa: BLE001 — SystemExit and friends from student code
            error = {"ename": type(exc).__name__, "evalue": str(exc)[:MAX_CELL_OUTPUT], "traceback": []}
        finally:
            sys.stdout, sys.stderr = real_stdout, real_stderr
        emit({"t": "cell_end", "index": cell["index"], "ok": error is None, "error": error,
              "stdout": stdout.value(), "stderr": stderr.value()})
    emit({"t": "done"})
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
