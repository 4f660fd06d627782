"""Run a harness worker in its own process group with a hard, OS-level timeout."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from avo.types import EvalResult, Status

RESULT = "result.json"


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_worker(job_dir: Path, timeout_s: float, env: dict[str, str] | None = None,
               prefix: list[str] | None = None) -> EvalResult:
    """`python -m avo.harness.worker job_dir`; the worker's only output is job_dir/result.json.

    prefix: a command the worker runs under (a profiler); the timeout kills both."""
    job_dir = Path(job_dir)
    (job_dir / RESULT).unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(job_dir / "worker.log", "wb") as log:
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "avo.harness.worker", str(job_dir)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent, env={**os.environ, **(env or {})})
        return wait_worker(proc, job_dir, timeout_s, t0)


def wait_worker(proc: subprocess.Popen, job_dir: Path, timeout_s: float, t0: float) -> EvalResult:
    """Wait for a started worker under the hard timeout, kill its process group, and read its result."""
    log_path = Path(job_dir) / "worker.log"
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return EvalResult(Status.TIMEOUT, error=f"killed after the {timeout_s:.0f} s hard timeout "
                          "(a hang, a deadlock, or far too slow)", log=_tail(log_path))
    finally:
        _kill_group(proc)  # stray children of the worker die with it
    result_path = Path(job_dir) / RESULT
    if not result_path.exists():
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        return EvalResult(Status.CRASHED, error=f"worker died ({how}) after {time.monotonic() - t0:.1f} s "
                          "without a result", log=_tail(log_path))
    try:
        return EvalResult.from_dict(json.loads(result_path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        return EvalResult(Status.CRASHED, error=f"unreadable worker result: {e}", log=_tail(log_path))


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a search killed hard (SIGKILL, Slurm) takes its worker with it
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
