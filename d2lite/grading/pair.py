"""The checker and the oracle as two plain processes, without a sandbox: for the grader's own tests
(trusted notebooks only) and for debugging a notebook's split. Student code never runs this way
under ``d2lite grade``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

__all__ = ["run_unsandboxed"]


def run_unsandboxed(job: dict, cwd: str, env: dict | None = None, timeout: float = 300) -> tuple[bytes, bytes]:
    """Run ``job`` (split.checker_job) with the oracle in ``cwd``; return (records, output)."""
    to_oracle_r, to_oracle_w = os.pipe()
    to_checker_r, to_checker_w = os.pipe()
    records_r, records_w = os.pipe()
    env = {**os.environ, **(env or {})}
    fds = {}

    def remap(mapping):
        def pre():
            # dup the ends to their fixed numbers (3, 4, 5) without clobbering each other
            moved = {target: os.dup(source) for target, source in mapping.items()}
            for target, source in moved.items():
                os.dup2(source, target)
                os.close(source)
        return pre

    oracle = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.environ.get('D2LITE_ORACLE_DEBUG') and exec(open(os.environ['D2LITE_ORACLE_DEBUG']).read()); from d2lite.grading import oracle; sys.exit(oracle.main())"],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(3, 4), preexec_fn=remap({3: to_oracle_r, 4: to_checker_w}), close_fds=True)
    checker = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.environ.get('D2LITE_CHECKER_DEBUG') and exec(open(os.environ['D2LITE_CHECKER_DEBUG']).read()); from d2lite.grading import checker; sys.exit(checker.main())"],
        cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(3, 4, 5), preexec_fn=remap({3: records_w, 4: to_oracle_w, 5: to_checker_r}), close_fds=True)
    for fd in (to_oracle_r, to_oracle_w, to_checker_r, to_checker_w, records_w):
        os.close(fd)
    out = {}

    def drain(name, stream):
        out[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("oracle", oracle.stdout), ("checker", checker.stdout))]
    for t in threads:
        t.start()
    checker.stdin.write(json.dumps({**job, "oracle_pid": oracle.pid}).encode())
    checker.stdin.close()
    chunks = []
    with os.fdopen(records_r, "rb") as fh:
        while chunk := fh.read(1 << 16):
            chunks.append(chunk)
    try:
        checker.wait(timeout)
    finally:
        if checker.poll() is not None:  # the checker said goodbye: the oracle exits on its own, or is killed
            try:
                oracle.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for proc in (checker, oracle):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for t in threads:
        t.join(5)
    return b"".join(chunks), out.get("checker", b"") + out.get("oracle", b"")

