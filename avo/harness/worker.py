"""The child side of the harness: python -m avo.harness.worker JOB_DIR (or --standby).

Reads JOB_DIR/job.json and JOB_DIR/source.cu, writes JOB_DIR/result.json atomically.
Everything that touches candidate code (NVRTC, the CUDA context) happens here. The worker names
the stage it is in (JOB_DIR/phase: compile, verify, screen, bench) so the parent can hold each
stage to its own time limit. A broken environment (no NVRTC, no driver, no GPU) is reported as
`unavailable`, never as a fault of the candidate.
"""
from __future__ import annotations

import os
import select
import sys
import time
import traceback
from pathlib import Path

from avo.fsutil import atomic_write_json, atomic_write_text
from avo.harness.ahead import COMPILED, NVRTC_S
from avo.harness.job import JOB_FILE, Job
from avo.harness.nvrtc import compile_candidate, compiler, nvrtc_version
from avo.harness.sandbox import PHASE, RESULT, _die_with_parent
from avo.types import EvalResult, Status


def compile_only(source: str, job: Job, allow_printf: bool = True, cache_dir: str | None = None) -> EvalResult:
    """NVRTC and its gates, nothing on a GPU. harness=compile allows printf (an operator's debugging); cache_dir:
    where the output stays (precompile)."""
    problem = job.problem_of()
    _phase(job, "compile")
    t0 = time.perf_counter()
    c = compile_candidate(source, job.arch, problem.head_dim, cache_dir, allow_printf=allow_printf,
                          max_local_bytes=job.harness["max_local_bytes"])
    dt = time.perf_counter() - t0
    common = dict(log=c.log[-8000:], registers=c.registers, spill_bytes=c.spill_bytes,
                  stack_bytes=c.stack_bytes, compile_s=dt, compiler=compiler())
    if not c.ok:
        return EvalResult(Status.COMPILE_ERROR, error=c.error or "compile error", **common)
    return EvalResult(Status.OK, ranked=False, smem_bytes=c.launch.smem, threads=c.launch.threads, **common)


def precompile(source: str, job: Job) -> EvalResult:
    """A search worker's next candidate compiled ahead (avo.harness.ahead): NVRTC's output and its seconds in
    JOB_DIR/compiled, for the evaluation to load; gated as the evaluation's own compile is (no printf)."""
    # below the timing workers' priority: a host thread descheduled between a timed launch's start event and the
    # launch itself puts idle GPU time inside the events (the seed's TFLOPS fell 0.7 % beside 8 such compiles)
    os.nice(NICE)
    folder = Path(job.job_dir) / COMPILED
    res = compile_only(source, job, allow_printf=False, cache_dir=str(folder))
    if res.ok:
        atomic_write_text(folder / NVRTC_S, f"{res.compile_s:.6f}")
    return res


def _log(line: str) -> None:
    print(line, flush=True)  # the worker's stdout is JOB_DIR/worker.log


def _phase(job: Job, name: str) -> None:
    atomic_write_text(Path(job.job_dir) / PHASE, name)


def gpu_evaluate(source: str, job: Job, check_only: bool = False) -> EvalResult:
    from avo.harness.evaluate import evaluate

    others = {name: Path(path).read_text() for name, path in job.others.items()}
    return evaluate(source, job.problem_of(), job.harness, job.arch, job.cache_dir, check_only, _log, others,
                    lambda name: _phase(job, name), job.lock, job.commit, job.compiled_dir)


def gpu_check(source: str, job: Job) -> EvalResult:
    return gpu_evaluate(source, job, check_only=True)


def gpu_bench(source: str, job: Job) -> EvalResult:
    """Several named sources (job.sources: name -> path), verified, then timed interleaved.

    Writes JOB_DIR/bench.json (name -> EvalResult); the returned result summarises the batch.
    """
    from avo.harness.benchmark import benchmark
    from avo.harness.devlock import gpu_lock
    from avo.harness.evaluate import finish, prepare, run_checks

    problem, hc = job.problem_of(), job.harness
    results, kernels = {}, {}
    for name, path in job.sources.items():
        _log(f"== {name}: compile and verify")
        kernel, res = prepare(Path(path).read_text(), problem, hc, job.arch, job.cache_dir, False, _log, job.lock)
        results[name] = res
        if kernel is not None:
            with gpu_lock(job.lock, exclusive=False):
                if run_checks(kernel, problem, hc, res, _log):
                    kernels[name] = kernel
    if kernels:
        _log(f"== timing {', '.join(kernels)} with baselines {', '.join(hc['baselines'])}")
        t0 = time.perf_counter()
        with gpu_lock(job.lock, exclusive=True):
            b = benchmark(kernels, problem.bench, hc, _log, set(kernels))
        for name in kernels:
            finish(results[name], b.configs[name], b.errors.get(name), b.sensed, time.perf_counter() - t0)
    atomic_write_json(Path(job.job_dir) / "bench.json", {n: r.to_dict() for n, r in results.items()})
    bad = [n for n, r in results.items() if not r.ok]
    return EvalResult(Status.ERROR if bad else Status.OK, error=f"not ok: {', '.join(bad)}" if bad else "")


def gpu_trials(source: str, job: Job) -> EvalResult:
    """Repeated paired benchmarks, for measuring the commit rule (benchmarks/commit_rule.py).

    job.sources: name -> path; job.pairs: [[condition, candidate name, incumbent name], ...];
    job.trials: repetitions. Each trial is the search's own paired benchmark (the candidate beside the
    incumbent, no baselines, every candidate launch checked against the incumbent's output); conditions
    alternate, so slow drift affects them alike. Writes JOB_DIR/trials.json.
    """
    from avo.harness.benchmark import benchmark
    from avo.harness.devlock import gpu_lock
    from avo.harness.evaluate import prepare

    problem, hc = job.problem_of(), job.harness
    kernels = {}
    for name, path in job.sources.items():
        kernel, res = prepare(Path(path).read_text(), problem, hc, job.arch, job.cache_dir, False, _log, job.lock)
        if kernel is None:
            return res
        kernels[name] = kernel
    import torch

    out = []
    with gpu_lock(job.lock, exclusive=True):
        for t in range(job.trials):
            for cond, cand, inc in job.pairs:
                # benchmark() gives each shape's buffers back when the shape ends: what stays allocated
                # between trials should be nothing, and the peak one shape's
                _log(f"== trial {t + 1}/{job.trials}: {cond} ({cand} against {inc}); "
                     f"{torch.cuda.memory_allocated() / 2**30:.1f} GB allocated, "
                     f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB")
                b = benchmark({"candidate": kernels[cand], "incumbent": kernels[inc]}, problem.bench, hc, _log,
                              {"candidate"}, baselines=[], reference="incumbent")
                if b.errors:
                    return EvalResult(Status.ERROR, error=f"{cond}: {b.errors}")
                out.append({"trial": t, "condition": cond, "configs": [
                    {"key": c.key, "samples": c.samples, "incumbent_samples": o.samples, "tflops": c.tflops,
                     "incumbent_tflops": o.tflops} for c, o in zip(b.configs["candidate"], b.configs["incumbent"],
                                                                   strict=True)]})
                atomic_write_json(Path(job.job_dir) / "trials.json", out)
    return EvalResult(Status.OK)


def gpu_profile(source: str, job: Job) -> EvalResult:
    """Compile, then launch twice on job.shape: the profiler records the second launch."""
    import torch

    from avo.harness.check import Outputs, random_inputs
    from avo.harness.devlock import gpu_lock
    from avo.harness.evaluate import prepare

    problem, hc = job.problem_of(), job.harness
    shape = next(s for s in problem.bench if s.key == job.shape)
    kernel, res = prepare(source, problem, hc, job.arch, job.cache_dir, False, _log, job.lock)
    if kernel is None:
        return res
    with gpu_lock(job.lock, exclusive=False):  # like every GPU use of a worker (ncu serialises the launches)
        gen = torch.Generator(device="cuda")
        gen.manual_seed(0)
        q, k, v = random_inputs(shape, gen)
        out = Outputs(shape)
        for _ in range(2):
            kernel(q, k, v, out.o, out.lse, shape.causal)
        torch.cuda.synchronize()
    _log(f"launched twice on {shape.key}")
    return res


MODES = {"compile": compile_only, "precompile": precompile, "evaluate": gpu_evaluate, "check": gpu_check,
         "bench": gpu_bench, "profile": gpu_profile, "trials": gpu_trials}
CPU_MODES = ("compile", "precompile")  # no CUDA context
NICE = 10


def environment(job: Job) -> None:
    """What every GPU job needs before any candidate runs; raises EnvironmentError with one line.

    A worker started cold (no spare was ready) creates its CUDA context under the device lock, as a
    spare does: a context starting up beside a timed launch would disturb it. Its allocations are
    bounded by harness.max_device_gb."""
    try:
        nvrtc_version()
    except RuntimeError as e:
        raise OSError(str(e)) from None
    if job.mode in CPU_MODES:
        return
    try:
        import torch

        from avo.harness.devlock import gpu_lock

        with gpu_lock(job.lock, exclusive=False):
            torch.cuda.set_device(job.device)
            torch.empty(1, device="cuda")
        bound_device_memory(job)
    except Exception as e:  # noqa: BLE001 - whatever CUDA raises here, the GPU is not usable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OSError(f"the GPU cannot be used ({type(e).__name__}: {first}); check the driver and "
                      "nvidia-smi, or use harness=compile") from None


def bound_device_memory(job: Job) -> None:
    """Cap what this process may allocate through torch at harness.max_device_gb (a kernel's own local
    memory is bounded by harness.max_local_bytes): one evaluation cannot starve another's."""
    import torch

    total = torch.cuda.get_device_properties(job.device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, job.harness["max_device_gb"] * 2**30 / total), job.device)


def reset_context(device: int) -> None:
    """Finish the device's work and reset its primary context: torch cannot use the GPU afterwards."""
    import torch
    from cuda.bindings import driver as drv

    from avo.harness.abi import check

    torch.cuda.synchronize()
    check(drv.cuDevicePrimaryCtxReset(check(drv.cuDeviceGet(device))))


def release_gpu(job: Job) -> None:
    """Give the GPU back before exiting, under the shared device lock: a context torn down by the
    driver after a kill frees (and scrubs) its memory whenever it happens, beside another worker's
    timed launch. The result is already written; any failure here only ends the process sooner."""
    if "torch" not in sys.modules or job.mode in (*CPU_MODES, "profile"):
        return
    from avo.harness.devlock import gpu_lock

    t0 = time.perf_counter()
    try:
        with gpu_lock(job.lock, exclusive=False):
            reset_context(job.device)
        _log(f"released the GPU in {time.perf_counter() - t0:.2f} s")
    except Exception as e:  # noqa: BLE001 - a broken context is gone with the process anyway
        _log(f"releasing the GPU failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); exiting")


def main(job_dir: str, env_error: str = "") -> int:
    job_dir = Path(job_dir)
    job = Job.read(job_dir)
    source_path = job_dir / "source.cu"
    source = source_path.read_text() if source_path.exists() else ""
    try:
        if env_error:
            raise OSError(env_error)
        environment(job)
    except OSError as e:
        atomic_write_json(job_dir / RESULT, EvalResult(Status.UNAVAILABLE, error=str(e)).to_dict())
        return 0
    try:
        result = MODES[job.mode](source, job)
    except Exception as e:  # noqa: BLE001 - everything is reported to the parent as a result
        first = (str(e).strip().splitlines() or [""])[0]  # torch appends paragraphs of advice
        status = getattr(e, "status", None)  # a harness fault carries its own (benchmark.NoReference: ERROR)
        result = EvalResult(status if isinstance(status, Status) else Status.CRASHED,
                            error=f"{type(e).__name__}: {first}", log=traceback.format_exc()[-8000:])
        if type(e).__name__ == "OutOfMemoryError":  # the harness's allocations: never the kernel's own
            result.status, result.error = Status.ERROR, (
                f"the evaluation needed more device memory than harness.max_device_gb={job.harness['max_device_gb']} "
                f"allows, or the GPU is full ({first[:200]})")
    atomic_write_json(job_dir / RESULT, result.to_dict())
    if job.mode != "profile":  # under a profiler its exit handlers must run; elsewhere the result is all
        sys.stdout.flush()
        release_gpu(job)
        sys.stdout.flush()
        os._exit(0)  # skip tearing torch down in Python: the parent has what it needs
    return 0


def standby(device: int, lock: str | None, warm: str | None = None) -> int:
    """`--standby DEVICE [LOCK [WARM_DIR]]`: pay for the torch import and CUDA start-up now, then
    for the first use of the baselines on the shapes of WARM_DIR/job.json (the harness's latest
    job; evaluate.warm_up), then run the job whose directory arrives on stdin (EOF: exit). The GPU
    harness keeps spares ready. GPU work holds the device lock shared, so it never overlaps another
    worker's timing; a job that arrives stops the warm-up."""
    t0 = time.perf_counter()
    env_error = ""
    try:
        import torch

        from avo.harness.devlock import gpu_lock
        from avo.harness.evaluate import warm_up

        with gpu_lock(lock, exclusive=False):
            torch.cuda.set_device(device)
            torch.empty(1, device="cuda")
        _log(f"standby: torch and CUDA ready in {time.perf_counter() - t0:.2f} s")
    except Exception as e:  # noqa: BLE001 - reported with the job it was meant for
        env_error = f"the GPU cannot be used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    if not env_error and warm and (Path(warm) / JOB_FILE).exists():
        t1 = time.perf_counter()
        try:
            spec = Job.read(Path(warm))
            n = warm_up(spec.problem_of(), spec.harness, lock, lambda: bool(select.select([sys.stdin], [], [], 0)[0]))
            _log(f"standby: baselines warmed on {n} shapes in {time.perf_counter() - t1:.2f} s")
        except Exception as e:  # noqa: BLE001 - a warm-up is an optimisation; the job meets any real problem
            _log(f"standby: warm-up skipped ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    job_dir = sys.stdin.readline().strip()
    return main(job_dir, env_error) if job_dir else 0


if __name__ == "__main__":
    _die_with_parent()  # also under a profiler, which is then the parent the search's kill reaches
    if sys.argv[1] == "--standby":
        sys.exit(standby(int(sys.argv[2]), *sys.argv[3:5]))
    sys.exit(main(sys.argv[1]))
