"""Run a harness worker in its own process group with hard, OS-level limits.

Four limits, each a SIGKILL of the whole process group: the job's overall `timeout_s`; a limit
per stage the worker names in JOB_DIR/phase (compile has its own, and the timed stages' limits
are derived from the incumbent's measured times by the harness); an absolute `deadline` (the
search's max_hours), which stops an evaluation in flight; and the group's host memory
(harness.max_host_gb), which the parent reads from /proc, so a compile bomb dies before it wakes
the host's out-of-memory killer (CUDA needs a large virtual address space: RLIMIT_AS cannot
bound what it really uses).

A worker that has written its result releases its GPU under the device lock and exits on its
own; it is killed only if it has not after EXIT_GRACE_S.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from avo.types import EvalResult, Status

RESULT = "result.json"
PHASE = "phase"      # the worker's current stage, written atomically
POLL_S = 0.05
MEMORY_POLL_S = 0.2  # /proc reads of the group's memory: about a millisecond each
EXIT_GRACE_S = 60.0  # a worker with its result in may take this long to release its GPU and exit
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_worker(job_dir: Path, timeout_s: float, env: dict[str, str] | None = None,
               prefix: list[str] | None = None, limits: dict[str, float] | None = None,
               deadline: float | None = None, max_host_gb: float | None = None,
               cancel: threading.Event | None = None) -> EvalResult:
    """`python -m avo.harness.worker job_dir`; the worker's only output is job_dir/result.json.

    prefix: a command the worker runs under (a profiler); the timeout kills both. cancel: set, the worker is
    killed (its result: timeout, "cancelled")."""
    job_dir = Path(job_dir)
    (job_dir / RESULT).unlink(missing_ok=True)
    (job_dir / PHASE).unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(job_dir / "worker.log", "wb") as log:
        # under a profiler the report is written after the worker exits: wait for the exit there
        return wait_worker(spawn([str(job_dir)], log, env=env, prefix=prefix), job_dir, timeout_s, t0, limits, deadline,
                           done_on_result=prefix is None, max_host_gb=max_host_gb, cancel=cancel)


# Workers are forked on one thread that lives as long as the process. PR_SET_PDEATHSIG fires when the *thread*
# that forked a process ends, not the process: a spare forked by one search worker's thread and handed to
# another's job was killed mid-evaluation (signal 9, recorded as crashed) when the first thread finished.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avo-spawn")


def spawn(args: list[str], log, env: dict[str, str] | None = None, prefix: list[str] | None = None,
          stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """The one way a worker starts: `python -m avo.harness.worker ARGS` in its own process group
    (so a kill reaches everything it started), dying with its parent process, output to `log`."""
    return _SPAWNER.submit(subprocess.Popen, [*(prefix or []), sys.executable, "-m", "avo.harness.worker", *args],
                           stdout=log, stderr=subprocess.STDOUT, stdin=stdin, start_new_session=True,
                           preexec_fn=_die_with_parent, env={**os.environ, **(env or {})}).result()


def wait_worker(proc: subprocess.Popen, job_dir: Path, timeout_s: float, t0: float,
                limits: dict[str, float] | None = None, deadline: float | None = None,
                done_on_result: bool = True, max_host_gb: float | None = None,
                cancel: threading.Event | None = None) -> EvalResult:
    """Wait for a started worker under its limits, end its process group, and read its result.

    done_on_result: the result file (written atomically) ends the wait; the worker then releases its
    GPU and exits on its own, which nobody waits for (a kill after EXIT_GRACE_S)."""
    log_path, phase_path = Path(job_dir) / "worker.log", Path(job_dir) / PHASE
    result_path = Path(job_dir) / RESULT
    limits = limits or {}
    phase, since, weighed, handed_over = "", time.monotonic(), 0.0, False
    try:
        while True:
            time.sleep(POLL_S)
            if _exited(proc):
                break
            if done_on_result and result_path.exists():
                handed_over = True
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
            elif cancel is not None and cancel.is_set():
                why = "cancelled: the harness closed before it finished"
            elif now - t0 >= timeout_s:
                why = (f"killed after the {timeout_s:.0f} s hard timeout (a hang, a deadlock, or far too slow)")
            elif phase in limits and now - since >= limits[phase]:
                why = (f"killed: the {phase} stage ran past its {limits[phase]:.0f} s limit "
                       + ("(compilation has its own limit)" if phase == "compile" else
                          "(derived from the incumbent's time for it: a hang, a deadlock, or far too slow)"))
            if why:
                return EvalResult(Status.TIMEOUT, error=why, log=_tail(log_path))
            if max_host_gb is not None and now - weighed >= MEMORY_POLL_S:
                weighed, used = now, group_memory(proc.pid)
                if used > max_host_gb * 2**30:
                    return _over_memory(used, max_host_gb, phase, log_path)
    finally:
        if handed_over:
            _end_later(proc)  # its result is in: it releases its GPU and exits by itself
        else:
            _kill_group(proc)  # stray children die with it
    if not result_path.exists():
        rc = proc.returncode
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        return EvalResult(Status.CRASHED, error=f"worker died ({how}) after {time.monotonic() - t0:.1f} s "
                          "without a result", log=_tail(log_path))
    try:
        return EvalResult.from_dict(json.loads(result_path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        return EvalResult(Status.CRASHED, error=f"unreadable worker result: {e}", log=_tail(log_path))


def group_memory(pid: int) -> int:
    """Bytes of anonymous resident memory of a process and all its descendants (/proc; 0 once gone).

    Resident minus file-backed pages: what a compile bomb grows, not the shared libraries it maps."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                fields = f.read().split()
            total += max(0, int(fields[1]) - int(fields[2])) * _PAGE
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except (OSError, ValueError, IndexError):
            continue  # it exited while being read
    return total


def _over_memory(used: int, limit_gb: float, phase: str, log_path: Path) -> EvalResult:
    """The result of a worker killed for its host memory: the candidate's fault while it compiles."""
    compiling = phase == "compile"
    why = (f"killed: the worker's host memory reached {used / 2**30:.1f} GB, over harness.max_host_gb={limit_gb:g}"
           + (" while compiling (a compile bomb)" if compiling else f" in the {phase or 'start-up'} stage"))
    return EvalResult(Status.COMPILE_ERROR if compiling else Status.ERROR, error=why, log=_tail(log_path))


def _exited(proc: subprocess.Popen) -> bool:
    """Has the worker exited? It is left unreaped, so its process group cannot be reused before it is killed."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped


def _end_later(proc: subprocess.Popen) -> None:
    """In the background: wait up to EXIT_GRACE_S for a worker to exit, then kill its group and reap it."""
    def wait() -> None:
        end = time.monotonic() + EXIT_GRACE_S
        while not _exited(proc) and time.monotonic() < end:
            time.sleep(4 * POLL_S)
        _kill_group(proc)

    threading.Thread(target=wait, name="avo-reap", daemon=True).start()


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a search killed hard (SIGKILL, Slurm) takes its worker with it
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (stray children with it), then reap the worker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
