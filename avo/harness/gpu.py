"""The ranking harness: verify and time each candidate on the local NVIDIA GPU (or GPUs).

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

Several GPUs (harness.devices, avo.harness.devices): each has its own lock, spares and probe, and
each evaluation runs whole on one of them (the candidate and the versions it is paired with, in
one worker). A GPU that fails its probe after a crash or a kill is taken out with one line and the
others go on; when none is left the search stops as above.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from avo.errors import ConfigError
from avo.harness import HarnessUnavailable, SandboxHarness
from avo.harness.abi import arch_name
from avo.harness.ahead import Ahead, ahead_jobs
from avo.harness.devices import Device, DevicePool, cuda_env, harness_devices, listed
from avo.harness.job import Job
from avo.harness.profile import ProfileError, export_csv, find_ncu, ncu_command, summarise
from avo.harness.sandbox import PHASE, RESULT, _kill_group, run_worker, spawn, wait_worker
from avo.harness.truths import DIR as TRUTHS
from avo.progress import harness_log as log
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
except Exception:  # names the device lock and NVML's sensors; the index serves where there is none
    uuid = ""
print(json.dumps({{"cc": cc, "name": name, "uuid": uuid}}))
"""
PROBE_TIMEOUT_S = 60


class ProbeFailed(HarnessUnavailable):
    """A GPU that does not answer the probe; `why` is the probe's own reason."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def probe_gpu(device: int = 0) -> dict:
    """{"cc": [major, minor], "name": str, "uuid": str} of the device, from a child process."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE.format(device=device)], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL, env={**os.environ, **cuda_env()})
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"the CUDA device probe hung for {PROBE_TIMEOUT_S} s; use harness=compile on machines "
                          "without a working GPU", f"the probe hung for {PROBE_TIMEOUT_S} s") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise ProbeFailed(f"no usable CUDA GPU {device} here ({why}); use harness=compile to compile and rank "
                          "nothing on CPU", why) from None
    return json.loads(r.stdout.strip().splitlines()[-1])


class DeviceLost(Exception):
    """The GPU an evaluation was placed on was taken out before it ran: place it again."""


class GpuHarness(SandboxHarness):
    """evaluate(source, problem, mode=None|"check", against=None): full evaluation, or correctness only."""
    name = "gpu"
    ranks = checks = profiles = True
    mode = "evaluate"

    def __init__(self, cfg, work_dir: Path, spare: bool = True, commit=None):
        super().__init__(cfg, work_dir, commit)
        locks = (Path(cfg.cache_dir).expanduser().parent if cfg.cache_dir else self.work_dir) / "locks"
        devices, cc = [], set()
        for index in harness_devices(cfg):
            try:
                info = probe_gpu(index)
            except HarnessUnavailable as e:
                if cfg.get("devices") is None:
                    raise
                raise HarnessUnavailable(f"harness.devices={listed(cfg.devices)}: {e}") from None
            devices.append(Device(index, info["name"], str(locks / f"gpu-{info.get('uuid') or index}.lock"),
                                  info.get("uuid", "")))
            cc.add(tuple(info["cc"]))
        if len({d.name for d in devices}) > 1:  # scores from different models would be ranked as one
            raise ConfigError(f"harness.devices={listed(cfg.devices)} mixes "
                              f"{' and '.join(sorted({d.name for d in devices}))}: list GPUs of one model")
        self.pool = DevicePool(devices)
        self.gpu_name = devices[0].name
        self.arch = arch_name(*cc.pop()) if cfg.arch == "auto" else cfg.arch
        self.n_spares = int(cfg.spares) if spare else 0
        self.ahead = Ahead(self._precompile, ahead_jobs(cfg))
        # the verify stage's input sets (avo.harness.truths): drawn now, so that no source can know them
        self.truth_seeds = [random.SystemRandom().getrandbits(62) for _ in range(int(cfg.truth_pool))]
        self.warm_dir, self._warm_problem = self.work_dir / "warm", None  # what spares warm up for: the latest problem
        self._spares_lock = threading.Lock()  # search.workers evaluate from several threads
        with self._spares_lock:
            for dev in devices:
                self._fill_spares(dev)
        if len(devices) > 1:
            log(f"timing on GPUs {', '.join(str(d.index) for d in devices)} ({self.gpu_name}): "
                f"one lock and {self.n_spares} spare workers each")

    def evaluate(self, source: str, problem: Problem, mode: str | None = None, against: list[Reference] | None = None,
                 deadline: float | None = None) -> EvalResult:
        while True:  # ends: each DeviceLost takes a GPU out, and with none left placement() raises
            try:
                return super().evaluate(source, problem, mode, against, deadline)
            except DeviceLost:
                continue

    def placement(self):
        return self.pool.use()

    def job(self, problem: Problem, mode: str | None = None, device: Device | None = None, **fields) -> Job:
        """A job for `device` (default: the first live GPU, for a job run outside evaluate: avo.bench)."""
        dev = device or self.pool.first()
        job = super().job(problem, mode, lock=dev.lock, **fields)
        job.place(dev.index, dev.uuid)
        if self.truth_seeds and job.mode in ("evaluate", "check"):
            job.harness = {**job.harness, "truths": {"seed": random.SystemRandom().choice(self.truth_seeds),
                                                     "dir": str(self.work_dir / TRUTHS)}}
        with self._spares_lock:
            if problem != self._warm_problem:  # spares started from now on warm up for this problem
                Job.for_problem(job.mode, problem, job.arch, job.harness).write(self.warm_dir)
                self._warm_problem = problem
        return job

    def _fill_spares(self, dev: Device) -> None:
        """Caller holds _spares_lock."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        while dev.alive and len(dev.spares) < self.n_spares:
            log_path = self.work_dir / f".spare-{uuid.uuid4().hex[:8]}.log"
            log_file = open(log_path, "wb")
            proc = spawn(["--standby", str(dev.index), dev.lock, str(self.warm_dir)], log_file, env=self.env(),
                         stdin=subprocess.PIPE)
            dev.spares.append((proc, log_path, log_file))

    def limits(self, against: list[Reference] | None) -> dict[str, float]:
        """Per-stage time limits: compilation's own, the others from the incumbent's measured times.

        An incumbent timed without a screen (the seed: nothing to screen against) gives the screen the
        benchmark's limit: the screen is a shorter run of fewer shapes of the same kernels."""
        limits = super().limits(against)
        inc = next((r for r in against or [] if r.role == "incumbent"), None)
        for stage, t in (inc.stage_s if inc else {}).items():
            if t:
                limits[stage] = max(float(self.cfg.stage_floor_s), float(self.cfg.stage_mult) * t)
        if "bench" in limits:
            limits.setdefault("screen", limits["bench"])
        return limits

    def run_job(self, job_dir: Path, limits: dict[str, float] | None = None,
                deadline: float | None = None, device: Device | None = None) -> EvalResult:
        dev = device or self.pool.first()
        spare = None
        with self._spares_lock:
            while dev.spares and spare is None:
                spare = dev.spares.pop(0)
                if spare[0].poll() is not None:  # it died getting ready
                    spare[2].close()
                    spare = None
            self._fill_spares(dev)  # the next start-up overlaps this evaluation
        if spare is None:
            result = run_worker(job_dir, self.cfg.timeout_s, env=self.env(), limits=limits, deadline=deadline,
                                max_host_gb=self.cfg.max_host_gb)
        else:
            result = self._run_on_spare(spare, job_dir, limits, deadline)
        result.device = dev.index
        return self._judge_device(result, dev)

    def _judge_device(self, result: EvalResult, dev: Device) -> EvalResult:
        """After a crash or a kill, a GPU that fails the probe is taken out (the last one stops the search,
        as does a broken environment); a GPU that a worker found unusable is probed too when others remain."""
        lost = result.status == Status.UNAVAILABLE and len(self.pool.live) > 1
        if result.status in (Status.CRASHED, Status.TIMEOUT) or lost:
            try:
                probe_gpu(dev.index)
            except ProbeFailed as e:
                self._take_out(dev, f"after a {result.status.value} evaluation", e)
                if lost:
                    raise DeviceLost() from None
        return super().outcome(result)

    def _take_out(self, dev: Device, when: str, failed: ProbeFailed) -> None:
        """No more work for `dev`: one line, its spares ended; HarnessUnavailable when it was the last."""
        live = self.pool.take_out(dev)
        with self._spares_lock:
            spares, dev.spares = dev.spares, []
        self._end(spares)
        if not live:
            raise HarnessUnavailable(str(failed))
        log(f"GPU {dev.index} ({dev.name}) failed the probe {when} ({failed.why}): taken out; "
            f"timing goes on on GPU {', '.join(str(d.index) for d in live)}")

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
            return wait_worker(proc, job_dir, self.cfg.timeout_s, t0, limits, deadline,
                               max_host_gb=self.cfg.max_host_gb)
        finally:
            log.close()

    def close(self) -> None:
        self.ahead.close()
        shutil.rmtree(self.work_dir / TRUTHS, ignore_errors=True)  # computed again in a minute: not worth the disk
        with self._spares_lock:
            self.n_spares, spares = 0, [s for dev in self.pool.all for s in dev.spares]
            for dev in self.pool.all:
                dev.spares = []
        self._end(spares)

    @staticmethod
    def _end(spares) -> None:
        for proc, log_path, log_file in spares:
            _kill_group(proc)
            log_file.close()
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
        with self.pool.use() as dev:  # ncu sees every GPU and records the launch on this one
            job_dir = self.write_job(source, problem, "profile", device=dev, shape=key)
            result = run_worker(job_dir, self.cfg.timeout_s, env=self.env(), prefix=ncu_command(ncu, job_dir),
                                limits=self.limits(None), max_host_gb=self.cfg.max_host_gb)
        if not result.ok:
            raise ProfileError(f"no profile: {result.status.value}: {result.error}\n{result.log[-1500:]}".rstrip())
        details_csv, raw_csv, source_csv = export_csv(ncu, job_dir)
        return summarise(details_csv, raw_csv, key, source_csv)

    def worker_mode(self, mode: str | None) -> str:
        """None: the full evaluation; check, compile, profile; bench and trials (avo.bench, benchmarks/)."""
        if mode not in (None, "evaluate", "check", "compile", "precompile", "profile", "bench", "trials"):
            raise ValueError(f"mode={mode!r}: use None (full evaluation), 'check' (correctness only) "
                             "or 'compile' (NVRTC and resources only)")
        return mode or self.mode

    def env(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1", **cuda_env()}  # worker.log shows progress as it happens
