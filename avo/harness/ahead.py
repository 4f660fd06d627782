"""Compiling ahead: the candidates a search worker evaluates next are compiled now, each in a light process.

An sm90 candidate takes NVRTC 8-12 s and the GPU 1-2 s, so a worker that compiles, then evaluates, keeps the GPU
idle most of the time. An operator whose next proposals do not depend on its last verdict (`agent=mutation`,
`agent.ahead`) lets the worker draw that many proposals ahead (avo.workers); the harness compiles them here while
the GPU stages of the current one run, and the evaluation's worker loads the cubin instead of compiling.

- A compile is `python -m avo.harness.worker JOB_DIR` in mode `precompile`: no CUDA, the compile stage's own limit,
  the host-memory bound and the process-group kill of every worker (avo.harness.sandbox).
- What it leaves is NVRTC's output (cubin, PTX, ptxas log) under the harness's cache key (the source, the compiler,
  the options, the headers) in a folder of its own, and the seconds NVRTC took. The evaluation compiles from the
  source as always where the key differs; where it matches, every gate after NVRTC (the PTX gate, the stack and
  local-memory bounds, the launch contract) runs again on what it loaded. Nothing that ran candidate code writes
  there: compiling runs none.
- A compile that failed (a compile error, a gate, a timeout, the memory bound) answers the evaluation itself, with
  the same status and message as the evaluation's own compile would give, and no GPU worker starts.
- Proposals the worker drops (its island's head moved on) are forgotten: not started, or their folder removed.
"""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from avo.types import EvalResult, Problem, Status, sha256

# a compile that ended so answers the evaluation: the candidate's own failure, the same the evaluation would meet
ANSWERS = frozenset({Status.COMPILE_ERROR, Status.TIMEOUT})

NVRTC_S = "nvrtc_s"    # in the compiled folder: NVRTC's own seconds, which the lineage records as compile_s
COMPILED = "compiled"  # the folder, in the compile's job directory
START_S = 30.0         # the compile job's overall limit is its stage's plus this (a Python start, no CUDA)


def ahead_jobs(cfg) -> int:
    """harness.ahead_jobs, or where it is 0: one compile per core but one, and no more than the host's memory holds
    at harness.max_host_gb each (an NVRTC compile of sm90 peaks near 0.4 GB; the bound is what a bomb may reach)."""
    if cfg.ahead_jobs:
        return int(cfg.ahead_jobs)
    memory_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return max(1, min((os.cpu_count() or 2) - 1, int(memory_gb // cfg.max_host_gb)))


class Ahead:
    """Compiles started ahead of their evaluations, by source; `compile_job(source, problem)` runs one to its end
    (the harness's sandboxed compile job) and returns (its result, the compiled folder)."""

    def __init__(self, compile_job, slots: int):
        self._compile_job = compile_job
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="avo-ahead")
        self._jobs: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.cancel = threading.Event()  # set by close(): compiles in flight are killed

    def start(self, source: str, problem: Problem) -> None:
        k = sha256(source)
        with self._lock:
            if k not in self._jobs and not self.cancel.is_set():
                self._jobs[k] = self._pool.submit(self._compile_job, source, problem)

    def take(self, source: str) -> tuple[EvalResult, Path] | None:
        """The compile of `source` started ahead, waited for (queued or running: its own limits bound the wait);
        None: there is none, or it did not finish (the evaluation compiles as usual)."""
        with self._lock:
            job = self._jobs.pop(sha256(source), None)
        if job is None:
            return None
        try:
            return job.result()
        except Exception:  # noqa: BLE001 - the evaluation compiles the source itself and meets any real problem
            return None

    def forget(self, source: str) -> None:
        with self._lock:
            job = self._jobs.pop(sha256(source), None)
        if job is not None and not job.cancel():
            job.add_done_callback(_discard_output)

    def close(self) -> None:
        self.cancel.set()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.cancel()
        self._pool.shutdown(wait=True)  # the compiles in flight see `cancel` and are killed at once
        for job in jobs:
            if not job.cancelled():
                _discard_output(job)


def _discard_output(job: Future) -> None:
    """Remove what a finished compile left (a compile that raised left nothing to remove)."""
    if job.exception() is None:
        discard(job.result()[1])


def discard(folder: Path) -> None:
    """Remove a compile's job directory (the compiled folder's parent)."""
    shutil.rmtree(Path(folder).parent, ignore_errors=True)
