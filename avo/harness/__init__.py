"""Harnesses evaluate candidate sources. The parent side here never imports CUDA.

A harness may be called from several threads at once (search.workers): each thread gets its own job
directories, and the GPU worker processes serialise their timed stages on the device lock (one per
GPU; with harness.devices the GPU harness spreads evaluations over several, avo.harness.devices).
"""
from __future__ import annotations

import contextlib
import shutil
import threading
from pathlib import Path

from avo.errors import HarnessUnavailable
from avo.fsutil import atomic_write_text
from avo.harness.ahead import ANSWERS, COMPILED, START_S, Ahead
from avo.harness.job import Job, write_sources
from avo.harness.sandbox import run_worker
from avo.types import EvalResult, Harness, Problem, Reference, Status, sha256

# harness.keep_jobs: which evaluations' job folders stay after their result is read. Everything an
# evaluation's row needs is in the lineage (its source, error and log tail); a folder per evaluation
# adds 5 files and 44 KB (compile only) or more (a GPU's result and log) per attempt: at 1600 attempts
# an hour, over a million inodes in a week. The failures of the harness's own making stay, for their
# whole worker.log.
KEPT_FAILURES = frozenset({Status.CRASHED, Status.TIMEOUT, Status.ERROR, Status.UNAVAILABLE})
KEEP_JOBS = {"all": lambda status: True, "failed": lambda status: status in KEPT_FAILURES,
             "none": lambda status: False}


class SandboxHarness:
    """Writes a job directory and runs one worker process per evaluation."""
    name = "sandbox"
    ranks = checks = profiles = False
    mode = ""
    ahead: Ahead | None = None  # compiles started ahead of their evaluations (the GPU harness: avo.harness.ahead)
    gpu_name = ""               # what the lineage's gpu column says of its evaluations ("": none)

    def __init__(self, cfg, work_dir: Path, commit=None):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.arch = cfg.arch  # NVRTC target; the GPU harness resolves "auto" to the device's own
        # the search's commit rule (search.commit): a worker times the baselines only beside a would-be
        # commit (and a sampled fraction); None: beside every paired evaluation
        self.commit = _plain(commit) if commit is not None else {}

    def job(self, problem: Problem, mode: str | None = None, device=None, **fields) -> Job:
        """The job this harness would hand its worker (avo.harness.job); device: where it runs (GPU harness)."""
        return Job.for_problem(self.worker_mode(mode), problem, self.arch, _plain(self.cfg),
                               cache_dir=str(Path(self.cfg.cache_dir).expanduser()) if self.cfg.cache_dir else None,
                               commit=self.commit, **fields)

    def evaluate(self, source: str, problem: Problem, mode: str | None = None, against: list[Reference] | None = None,
                 deadline: float | None = None) -> EvalResult:
        """mode: the worker mode; None is the harness's full evaluation ("check" = correctness only).
        against: committed versions to time side by side (only a full evaluation of a timing harness)."""
        full = self.worker_mode(mode) == "evaluate"
        others = against if self.ranks and full else None
        early = self.ahead.take(source) if self.ahead is not None and full else None
        if early is not None and early[0].status in ANSWERS:  # its compile failed: no GPU worker needed
            self._done(early[0], early[1].parent)
            early[0].gpu = self.gpu_name
            return early[0]
        compiled = early[1] if early is not None and early[0].ok else None
        try:
            with self.placement() as device:
                job_dir = self.write_job(source, problem, mode, others=others, device=device,
                                         compiled_dir=str(compiled) if compiled else None)
                result = self.run_job(job_dir, self.limits(others), deadline, device)
        finally:
            if early is not None:
                self._done(early[0], early[1].parent)
        self._done(result, job_dir)
        return result

    def _done(self, result: EvalResult, job_dir: Path) -> None:
        if not KEEP_JOBS[self.cfg.keep_jobs](result.status):
            shutil.rmtree(job_dir, ignore_errors=True)  # a worker still exiting may hold a file open: harmless

    def _precompile(self, source: str, problem: Problem) -> tuple[EvalResult, Path]:
        """One compile ahead (avo.harness.ahead), run to its end in its own worker process."""
        job_dir = self.write_job(source, problem, "precompile")
        limit = float(self.cfg.compile_timeout_s)
        result = run_worker(job_dir, limit + START_S, env=self.env(), limits={"compile": limit},
                            max_host_gb=self.cfg.max_host_gb, cancel=self.ahead.cancel if self.ahead else None)
        return result, job_dir / COMPILED

    def placement(self):
        """The device an evaluation runs on, held for the block (None: this harness runs no kernel)."""
        return contextlib.nullcontext()

    def write_job(self, source: str, problem: Problem, mode: str | None = None,
                  others: list[Reference] | None = None, device=None, **fields) -> Path:
        job = self.job(problem, mode, device, **fields)
        h = sha256(source)[:16]
        job_dir = self.work_dir / f"{h}-{job.mode}{_thread_tag()}"
        atomic_write_text(job_dir / "source.cu", source)
        # the versions timed side by side, as files beside the candidate
        job.others = write_sources(job_dir, {ref.role: ref.source for ref in others or []})
        return job.write(job_dir)

    def limits(self, against: list[Reference] | None) -> dict[str, float]:
        """Per-stage time limits: compilation has its own (the GPU harness derives the others)."""
        return {"compile": float(self.cfg.compile_timeout_s)}

    def run_job(self, job_dir: Path, limits: dict[str, float] | None = None,
                deadline: float | None = None, device=None) -> EvalResult:
        return self.outcome(run_worker(job_dir, self.cfg.timeout_s, env=self.env(), limits=limits,
                                       deadline=deadline, max_host_gb=self.cfg.max_host_gb))

    def outcome(self, result: EvalResult) -> EvalResult:
        """A worker's result, or HarnessUnavailable where it says the environment is broken."""
        if result.status == Status.UNAVAILABLE:
            raise HarnessUnavailable(result.error)
        return result

    def worker_mode(self, mode: str | None) -> str:
        return mode or self.mode

    def env(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


def _plain(cfg) -> dict:
    """A config (OmegaConf, a dict or a dataclass) as a plain dict for a job file."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))


def _thread_tag() -> str:
    """A job directory per thread: the workers of a search (search.workers) may evaluate the same source at once."""
    t = threading.current_thread()
    return "" if t is threading.main_thread() else f"-t{threading.get_native_id()}"


class CompileHarness(SandboxHarness):
    """Compiles with NVRTC and reports resources; ranks nothing (no GPU needed)."""
    name = "compile"
    ranks = False
    mode = "compile"

    def worker_mode(self, mode: str | None) -> str:
        return "compile"  # every stage it offers is the compile stage


class HarnessBench:
    """The avo.types.Bench an operator gets for one step: the harness bound to the problem and the
    incumbent (benchmarks are timed side by side with it), results cached by source hash."""

    def __init__(self, harness: Harness, problem: Problem, incumbent: Reference | None = None,
                 deadline: float | None = None, alpha: float = 0.01):
        self._harness, self._problem, self._incumbent = harness, problem, incumbent
        self._deadline, self._alpha = deadline, alpha
        self.name, self.ranks = harness.name, harness.ranks
        self.checks, self.profiles = harness.checks, harness.profiles
        self.timeout_s = float(harness.cfg.timeout_s) if hasattr(harness, "cfg") else 600.0
        self._results: dict[tuple[str, str], EvalResult] = {}

    def _run(self, source: str, purpose: str) -> EvalResult:
        from avo.paired import annotate

        key = (sha256(source), purpose)
        if key not in self._results:
            full = purpose == "benchmark"
            r = self._harness.evaluate(source, self._problem, mode=None if full else purpose,
                                       against=[self._incumbent] if full and self._incumbent else None,
                                       deadline=self._deadline)
            annotate(r, self._alpha)
            self._results[key] = r
        return self._results[key]

    def compile(self, source: str) -> EvalResult:
        return self._run(source, "compile")

    def check(self, source: str) -> EvalResult:
        return self._run(source, "check")

    def benchmark(self, source: str) -> EvalResult:
        return self._run(source, "benchmark")

    def profile(self, source: str, shape: str | None = None) -> str:
        from avo.harness.profile import ProfileError

        if not self.profiles:
            raise ProfileError(f"profiling is not available with harness={self.name}: it runs no kernel. Use "
                               "compile (registers, spills, shared memory) instead.")
        return self._harness.profile(source, self._problem, shape)


def make_harness(cfg, work_dir: Path, commit=None) -> Harness:
    """The configured harness; commit: the search's commit rule (search.commit), for the GPU workers."""
    if cfg.name == "compile":
        return CompileHarness(cfg, work_dir, commit)
    if cfg.name == "gpu":
        from avo.harness.gpu import GpuHarness

        return GpuHarness(cfg, work_dir, commit=commit)
    raise ValueError(f"unknown harness {cfg.name!r}")
