"""The ranking harness: verify and time each candidate on the local NVIDIA GPU.

The parent never imports CUDA; every evaluation runs in a fresh worker process (see
avo.harness.evaluate for what it does). evaluate(..., mode="check") stops after correctness:
the fast test an agent runs while editing (ranked=False, no timing). precompile() fills the
cubin cache with compile-only workers on CPU cores while the GPU is busy with something else.

Start-up (Python, torch, CUDA context: about 4 s) is paid ahead of time: after every evaluation
the harness starts one spare worker that gets ready and waits for its job on stdin, while the
operator writes the next candidate. The spare never runs alongside a timed evaluation's start;
it holds an idle CUDA context (a few hundred MB) while it waits. close() ends it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from avo.harness import HarnessUnavailable, SandboxHarness
from avo.harness.profile import ProfileError, export_csv, find_ncu, ncu_command, summarise
from avo.harness.sandbox import RESULT, _die_with_parent, _kill_group, run_worker, wait_worker
from avo.types import EvalResult, Problem

_PROBE = """
import json
from cuda.bindings import driver as d
def ok(r):
    if int(r[0]): raise SystemExit(f"CUDA driver error {{int(r[0])}}")
    return r[1] if len(r) > 1 else None
ok(d.cuInit(0))
n = ok(d.cuDeviceGetCount())
i = {device}
if i >= n: raise SystemExit(f"device {{i}} requested, {{n}} visible")
dev = ok(d.cuDeviceGet(i))
A = d.CUdevice_attribute
cc = [ok(d.cuDeviceGetAttribute(a, dev)) for a in (A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                    A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)]
name = ok(d.cuDeviceGetName(256, dev)).split(b"\\0")[0].decode()
print(json.dumps({{"cc": cc, "name": name}}))
"""
PROBE_TIMEOUT_S = 60


def probe_gpu(device: int = 0) -> dict:
    """{"cc": [major, minor], "name": str} of the device, from a child process."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE.format(device=device)], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HarnessUnavailable(f"the CUDA device probe hung for {PROBE_TIMEOUT_S} s; "
                                 "use harness=compile on machines without a working GPU") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise HarnessUnavailable(f"no usable CUDA GPU {device} here ({why}); "
                                 "use harness=compile to compile and rank nothing on CPU") from None
    return json.loads(r.stdout.strip().splitlines()[-1])


def arch_of(cc: list[int]) -> str:
    major, minor = cc
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


class GpuHarness(SandboxHarness):
    """evaluate(source, problem, mode=None|"check"): full evaluation, or correctness only."""
    name = "gpu"
    ranks = True
    mode = "evaluate"

    def __init__(self, cfg, work_dir: Path, spare: bool = True):
        super().__init__(cfg, work_dir)
        info = probe_gpu(cfg.device)
        self.gpu_name = info["name"]
        self.arch = arch_of(info["cc"]) if cfg.arch == "auto" else cfg.arch
        self.use_spare = spare
        self._spare: tuple[subprocess.Popen, Path, object] | None = None
        self._start_spare()

    def _start_spare(self) -> None:
        if not self.use_spare or self._spare is not None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f".spare-{uuid.uuid4().hex[:8]}.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "avo.harness.worker", "--standby", str(self.cfg.device)],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent, env={**os.environ, **self.env()})
        self._spare = (proc, log_path, log)

    def run_job(self, job_dir: Path) -> EvalResult:
        spare, self._spare = self._spare, None
        try:
            if spare is None or spare[0].poll() is not None:  # none, or it died getting ready
                if spare is not None:
                    spare[2].close()
                return run_worker(job_dir, self.cfg.timeout_s, env=self.env())
            return self._run_on_spare(spare, job_dir)
        finally:
            self._start_spare()

    def _run_on_spare(self, spare, job_dir: Path) -> EvalResult:
        """run_worker's contract (hard timeout, process-group kill, result.json) on a ready worker."""
        proc, log_path, log = spare
        (job_dir / RESULT).unlink(missing_ok=True)
        os.replace(log_path, job_dir / "worker.log")  # the spare's open log follows the rename
        t0 = time.monotonic()
        try:
            proc.stdin.write(f"{job_dir.resolve()}\n".encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died getting ready; wait_worker says how
        try:
            return wait_worker(proc, job_dir, self.cfg.timeout_s, t0)
        finally:
            log.close()

    def close(self) -> None:
        spare, self._spare, self.use_spare = self._spare, None, False
        if spare is not None:
            _kill_group(spare[0])
            spare[2].close()
            spare[1].unlink(missing_ok=True)

    def profile(self, source: str, problem: Problem, shape: str | None = None) -> str:
        """Nsight Compute summary of one launch on a benchmark shape (default: the first).

        Raises ProfileError with one actionable line when there is no profile to give."""
        ncu = find_ncu(self.cfg.profiler)
        if ncu is None:
            raise ProfileError(f"Nsight Compute ({self.cfg.profiler}) is not installed here; set harness.profiler "
                               "to its path, or use compile (registers, spills) and benchmark instead")
        keys = [s.key for s in problem.bench]
        key = shape or keys[0]
        if key not in keys:
            raise ProfileError(f"unknown shape {key!r}; profile one of: {', '.join(keys)}")
        job_dir = self.write_job(source, problem, "profile", shape=key)
        result = run_worker(job_dir, self.cfg.timeout_s, env=self.env(), prefix=ncu_command(ncu, job_dir))
        if not result.ok:
            raise ProfileError(f"no profile: {result.status.value}: {result.error}\n{result.log[-1500:]}".rstrip())
        return summarise(*export_csv(ncu, job_dir), key)

    def worker_mode(self, mode: str | None) -> str:
        if mode == "profile":
            return mode
        if mode not in (None, "evaluate", "check", "compile"):
            raise ValueError(f"mode={mode!r}: use None (full evaluation), 'check' (correctness only) "
                             "or 'compile' (NVRTC and resources only)")
        return mode or self.mode

    def env(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1"}  # worker.log shows progress as it happens

    def precompile(self, sources: list[str], problem: Problem, workers: int | None = None) -> list[EvalResult]:
        """Compile sources in parallel CPU worker processes, filling the cubin cache."""
        from avo.harness import CompileHarness

        comp = CompileHarness(self.cfg, self.work_dir)
        comp.arch = self.arch
        n = workers or max(1, min(len(sources), (os.cpu_count() or 2) - 1))
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda s: comp.evaluate(s, problem), sources))
