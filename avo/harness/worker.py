"""The child side of the harness: python -m avo.harness.worker JOB_DIR (or --standby).

Reads JOB_DIR/job.json and JOB_DIR/source.cu, writes JOB_DIR/result.json atomically.
Everything that touches candidate code (NVRTC, the CUDA context) happens here.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from avo.fsutil import atomic_write_json
from avo.harness.nvrtc import compile_source
from avo.harness.sandbox import RESULT, _die_with_parent
from avo.types import EvalResult, Problem, Shape, Status


def problem_from_dict(d: dict) -> Problem:
    return Problem(d["name"], d["heads_q"], d["heads_kv"], d["head_dim"],
                   tuple(Shape(**s) for s in d["bench"]), tuple(Shape(**s) for s in d["check"]))


def compile_only(source: str, job: dict) -> EvalResult:
    problem = problem_from_dict(job["problem"])
    t0 = time.perf_counter()
    c = compile_source(source, job["arch"], problem.head_dim, job.get("cache_dir"))
    dt = time.perf_counter() - t0
    common = dict(log=c.log[-8000:], registers=c.registers, spill_bytes=c.spill_bytes,
                  stack_bytes=c.stack_bytes, compile_s=dt)
    if not c.ok:
        return EvalResult(Status.COMPILE_ERROR, error=c.error or "compile error", **common)
    return EvalResult(Status.OK, ranked=False, smem_bytes=c.launch.smem, threads=c.launch.threads, **common)


def _log(line: str) -> None:
    print(line, flush=True)  # the worker's stdout is JOB_DIR/worker.log


def gpu_evaluate(source: str, job: dict, check_only: bool = False) -> EvalResult:
    from avo.harness.evaluate import evaluate

    return evaluate(source, problem_from_dict(job["problem"]), job["harness"], job["arch"],
                    job.get("cache_dir"), check_only, _log)


def gpu_check(source: str, job: dict) -> EvalResult:
    return gpu_evaluate(source, job, check_only=True)


def gpu_bench(source: str, job: dict) -> EvalResult:
    """Several named sources (job["sources"]: name -> path), verified, then timed interleaved.

    Writes JOB_DIR/bench.json (name -> EvalResult); the returned result summarises the batch.
    """
    from avo.harness.evaluate import benchmark, device_arch, finish, prepare, run_checks

    problem, hc = problem_from_dict(job["problem"]), job["harness"]
    arch = device_arch(hc.get("device", 0)) if job["arch"] == "auto" else job["arch"]
    results, kernels = {}, {}
    for name, path in job["sources"].items():
        _log(f"== {name}: compile and verify")
        kernel, res = prepare(Path(path).read_text(), problem, hc, arch, job.get("cache_dir"), False, _log)
        results[name] = res
        if kernel is not None and run_checks(kernel, problem, hc, res, _log):
            kernels[name] = kernel
    if kernels:
        _log(f"== timing {', '.join(kernels)} with baselines {', '.join(hc['baselines'])}")
        t0 = time.perf_counter()
        configs, errors, sensed = benchmark(kernels, problem, hc, _log)
        for name in kernels:
            finish(results[name], configs[name], errors.get(name), sensed, time.perf_counter() - t0)
    atomic_write_json(Path(job["job_dir"]) / "bench.json", {n: r.to_dict() for n, r in results.items()})
    bad = [n for n, r in results.items() if not r.ok]
    return EvalResult(Status.ERROR if bad else Status.OK, error=f"not ok: {', '.join(bad)}" if bad else "")


def gpu_profile(source: str, job: dict) -> EvalResult:
    """Compile, then launch twice on job["shape"]: the profiler records the second launch."""
    import torch

    from avo.harness.check import Outputs, random_inputs
    from avo.harness.evaluate import device_arch, prepare

    problem, hc = problem_from_dict(job["problem"]), job["harness"]
    shape = next(s for s in problem.bench if s.key == job["shape"])
    arch = device_arch(hc.get("device", 0)) if job["arch"] == "auto" else job["arch"]
    kernel, res = prepare(source, problem, hc, arch, job.get("cache_dir"), False, _log)
    if kernel is None:
        return res
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    q, k, v = random_inputs(shape, gen)
    out = Outputs(shape)
    for _ in range(2):
        kernel(q, k, v, out.o, out.lse, shape.causal)
    torch.cuda.synchronize()
    _log(f"launched twice on {shape.key}")
    return res


MODES = {"compile": compile_only, "evaluate": gpu_evaluate, "check": gpu_check, "bench": gpu_bench,
         "profile": gpu_profile}


def main(job_dir: str) -> int:
    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    job["job_dir"] = str(job_dir)
    source_path = job_dir / "source.cu"
    source = source_path.read_text() if source_path.exists() else ""
    try:
        result = MODES[job["mode"]](source, job)
    except Exception as e:  # noqa: BLE001 - everything is reported to the parent as a result
        first = (str(e).strip().splitlines() or [""])[0]  # torch appends paragraphs of advice
        result = EvalResult(Status.CRASHED, error=f"{type(e).__name__}: {first}", log=traceback.format_exc()[-8000:])
    atomic_write_json(job_dir / RESULT, result.to_dict())
    return 0


def standby(device: int) -> int:
    """`--standby`: pay for the torch import and CUDA start-up now, then run the job whose
    directory arrives on stdin (EOF: exit). The GPU harness keeps one such spare ready."""
    t0 = time.perf_counter()
    import torch

    import avo.harness.evaluate  # noqa: F401 - the import is the point: it is the slow part

    torch.cuda.set_device(device)
    torch.empty(1, device="cuda")
    _log(f"standby: torch and CUDA ready in {time.perf_counter() - t0:.2f} s")
    job_dir = sys.stdin.readline().strip()
    return main(job_dir) if job_dir else 0


if __name__ == "__main__":
    _die_with_parent()  # also under a profiler, which is then the parent the search's kill reaches
    sys.exit(standby(int(sys.argv[2])) if sys.argv[1] == "--standby" else main(sys.argv[1]))
