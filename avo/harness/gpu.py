"""The ranking harness: verify and time each candidate on the local NVIDIA GPU.

The parent never imports CUDA; every evaluation runs in a fresh worker process (see
avo.harness.evaluate for what it does). evaluate(..., mode="check") stops after correctness:
the fast test an agent runs while editing (ranked=False, no timing). evaluate(..., against=[the
incumbent, ...]) times the candidate side by side with those versions (avo.paired).

Start-up (Python, torch, CUDA context: 5-7 s on an H200 node) is paid ahead of time: the harness
keeps `harness.spares` workers ready, each waiting for its job on stdin, and starts a new one as
soon as one is handed a job, so the next start-up overlaps this evaluation. A spare's CUDA
start-up holds the device lock shared (avo.harness.devlock), so it never overlaps a timing; an
idle spare holds a CUDA context (a few hundred MB). close() ends them.

Time limits: compilation has its own (harness.compile_timeout_s); each later stage's limit is
derived from the incumbent's measured time for it (harness.stage_mult times, at least
harness.stage_floor_s), so a hang at the default set dies within seconds, not the overall
harness.timeout_s. A result that says the environment is broken, or a GPU that no longer
answers the probe after a crash or a kill, stops the search with one line (HarnessUnavailable).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from avo.fsutil import atomic_write_text
from avo.harness import HarnessUnavailable, SandboxHarness
from avo.harness.abi import arch_name
from avo.harness.job import JOB_FILE, Job
from avo.harness.profile import ProfileError, export_csv, find_ncu, ncu_command, summarise
from avo.harness.sandbox import PHASE, RESULT, _kill_group, run_worker, spawn, wait_worker
from avo.types import EvalResult, Problem, Reference, Status

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
try:
    uuid = bytes(int(b) & 0xFF for b in ok(d.cuDeviceGetUuid(dev)).bytes).hex()
except Exception:  # a name for the device lock only; the index serves where there is none
    uuid = ""
print(json.dumps({{"cc": cc, "name": name, "uuid": uuid}}))
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


class GpuHarness(SandboxHarness):
    """evaluate(source, problem, mode=None|"check", against=None): full evaluation, or correctness only."""
    name = "gpu"
    ranks = checks = profiles = True
    mode = "evaluate"

    def __init__(self, cfg, work_dir: Path, spare: bool = True):
        super().__init__(cfg, work_dir)
        info = probe_gpu(cfg.device)
        self.gpu_name = info["name"]
        self.arch = arch_name(*info["cc"]) if cfg.arch == "auto" else cfg.arch
        locks = Path(cfg.cache_dir).expanduser().parent if cfg.cache_dir else self.work_dir
        self.lock = str(locks / "locks" / f"gpu-{info.get('uuid') or cfg.device}.lock")
        self.n_spares = int(cfg.get("spares", 1)) if spare else 0
        self.warm_dir, self._warm_spec = self.work_dir / "warm", ""  # what spares warm up for: the latest job
        self._spares: list[tuple[subprocess.Popen, Path, object]] = []
        self._spares_lock = threading.Lock()  # search.workers evaluate from several threads
        with self._spares_lock:
            self._fill_spares()

    def job(self, problem: Problem, mode: str | None = None, **fields) -> Job:
        return super().job(problem, mode, lock=self.lock, **fields)

    def _fill_spares(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        while len(self._spares) < self.n_spares:
            log_path = self.work_dir / f".spare-{uuid.uuid4().hex[:8]}.log"
            log = open(log_path, "wb")
            proc = spawn(["--standby", str(self.cfg.device), self.lock, str(self.warm_dir)], log, env=self.env(),
                         stdin=subprocess.PIPE)
            self._spares.append((proc, log_path, log))

    def limits(self, against: list[Reference] | None) -> dict[str, float]:
        """Per-stage time limits: compilation's own, the others from the incumbent's measured times."""
        limits = super().limits(against)
        inc = next((r for r in against or [] if r.role == "incumbent"), None)
        for stage, t in (inc.stage_s if inc else {}).items():
            if t:
                limits[stage] = max(float(self.cfg.stage_floor_s), float(self.cfg.stage_mult) * t)
        return limits

    def run_job(self, job_dir: Path, limits: dict[str, float] | None = None,
                deadline: float | None = None) -> EvalResult:
        spare = None
        with self._spares_lock:
            spec = (job_dir / JOB_FILE).read_text()
            if spec != self._warm_spec:  # the next spares warm up for this job's problem
                atomic_write_text(self.warm_dir / JOB_FILE, spec)
                self._warm_spec = spec
            while self._spares and spare is None:
                spare = self._spares.pop(0)
                if spare[0].poll() is not None:  # it died getting ready
                    spare[2].close()
                    spare = None
            self._fill_spares()  # the next start-up overlaps this evaluation
        if spare is None:
            return super().run_job(job_dir, limits, deadline)
        return self.outcome(self._run_on_spare(spare, job_dir, limits, deadline))

    def outcome(self, result: EvalResult) -> EvalResult:
        result = super().outcome(result)
        if result.status in (Status.CRASHED, Status.TIMEOUT):
            probe_gpu(self.cfg.device)  # a GPU left unusable stops the search here, with one line
        return result

    def _run_on_spare(self, spare, job_dir: Path, limits, deadline) -> EvalResult:
        """run_worker's contract (limits, process-group kill, result.json) on a ready worker."""
        proc, log_path, log = spare
        (job_dir / RESULT).unlink(missing_ok=True)
        (job_dir / PHASE).unlink(missing_ok=True)
        os.replace(log_path, job_dir / "worker.log")  # the spare's open log follows the rename
        t0 = time.monotonic()
        try:
            proc.stdin.write(f"{job_dir.resolve()}\n".encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died getting ready; wait_worker says how
        try:
            return wait_worker(proc, job_dir, self.cfg.timeout_s, t0, limits, deadline)
        finally:
            log.close()

    def close(self) -> None:
        with self._spares_lock:
            spares, self._spares, self.n_spares = self._spares, [], 0
        for proc, log_path, log in spares:
            _kill_group(proc)
            log.close()
            log_path.unlink(missing_ok=True)

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
        result = run_worker(job_dir, self.cfg.timeout_s, env=self.env(), prefix=ncu_command(ncu, job_dir),
                            limits=self.limits(None))
        if not result.ok:
            raise ProfileError(f"no profile: {result.status.value}: {result.error}\n{result.log[-1500:]}".rstrip())
        return summarise(*export_csv(ncu, job_dir), key)

    def worker_mode(self, mode: str | None) -> str:
        """None: the full evaluation; check, compile, profile; bench and trials (avo.bench, benchmarks/)."""
        if mode not in (None, "evaluate", "check", "compile", "profile", "bench", "trials"):
            raise ValueError(f"mode={mode!r}: use None (full evaluation), 'check' (correctness only) "
                             "or 'compile' (NVRTC and resources only)")
        return mode or self.mode

    def env(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1"}  # worker.log shows progress as it happens
