"""Run a harness worker in its own process group with hard, OS-level time limits.

Three limits, each a SIGKILL of the whole process group: the job's overall `timeout_s`; a limit
per stage the worker names in JOB_DIR/phase (compile has its own, and the timed stages' limits
are derived from the incumbent's measured times by the harness); and an absolute `deadline`
(the search's max_hours), which stops an evaluation in flight.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from avo.types import EvalResult, Status

RESULT = "result.json"
PHASE = "phase"      # the worker's current stage, written atomically
POLL_S = 0.05


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_worker(job_dir: Path, timeout_s: float, env: dict[str, str] | None = None,
               prefix: list[str] | None = None, limits: dict[str, float] | None = None,
               deadline: float | None = None) -> EvalResult:
    """`python -m avo.harness.worker job_dir`; the worker's only output is job_dir/result.json.

    prefix: a command the worker runs under (a profiler); the timeout kills both."""
    job_dir = Path(job_dir)
    (job_dir / RESULT).unlink(missing_ok=True)
    (job_dir / PHASE).unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(job_dir / "worker.log", "wb") as log:
        # under a profiler the report is written after the worker exits: wait for the exit there
        return wait_worker(spawn([str(job_dir)], log, env=env, prefix=prefix), job_dir, timeout_s, t0, limits, deadline,
                           done_on_result=prefix is None)


def spawn(args: list[str], log, env: dict[str, str] | None = None, prefix: list[str] | None = None,
          stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """The one way a worker starts: `python -m avo.harness.worker ARGS` in its own process group
    (so a kill reaches everything it started), dying with its parent, output to `log`."""
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "avo.harness.worker", *args], stdout=log,
                            stderr=subprocess.STDOUT, stdin=stdin, start_new_session=True,
                            preexec_fn=_die_with_parent, env={**os.environ, **(env or {})})


def wait_worker(proc: subprocess.Popen, job_dir: Path, timeout_s: float, t0: float,
                limits: dict[str, float] | None = None, deadline: float | None = None,
                done_on_result: bool = True) -> EvalResult:
    """Wait for a started worker under its limits, kill its process group, and read its result.

    done_on_result: the result file (written atomically, the worker's last act) ends the wait; the
    worker's own exit, tearing down torch and a CUDA context, can take most of a second."""
    log_path, phase_path = Path(job_dir) / "worker.log", Path(job_dir) / PHASE
    result_path = Path(job_dir) / RESULT
    limits = limits or {}
    phase, since, rc = "", time.monotonic(), None
    try:
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if done_on_result and result_path.exists():
                break
            now = time.monotonic()
            try:
                current = phase_path.read_text()
            except OSError:
                current = phase
            if current != phase:
                phase, since = current, now
            why = None
            if deadline is not None and now >= deadline:
                why = "stopped at the search's deadline (search.max_hours)"
            elif now - t0 >= timeout_s:
                why = (f"killed after the {timeout_s:.0f} s hard timeout (a hang, a deadlock, or far too slow)")
            elif phase in limits and now - since >= limits[phase]:
                why = (f"killed: the {phase} stage ran past its {limits[phase]:.0f} s limit "
                       + ("(compilation has its own limit)" if phase == "compile" else
                          "(derived from the incumbent's time for it: a hang, a deadlock, or far too slow)"))
            if why:
                return EvalResult(Status.TIMEOUT, error=why, log=_tail(log_path))
    finally:
        _kill_group(proc, reap=rc is not None or not result_path.exists())  # stray children die with it
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


def _kill_group(proc: subprocess.Popen, reap: bool = True) -> None:
    """SIGKILL the worker's process group; reap it now, or (reap=False: its result is in) in the
    background, so that nobody waits for the kernel to tear its CUDA context down."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if reap:
        proc.wait()
    else:
        threading.Thread(target=proc.wait, name="avo-reap", daemon=True).start()
