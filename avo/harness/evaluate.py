"""Worker-side GPU evaluation: gates and compile, verify, a paired screen, the paired benchmark.

`evaluate` is the search's fitness: one candidate, checked (avo.harness.verify) and timed side by
side with the incumbent (avo.harness.benchmark). The FP32 truths of the checks are computed while
NVRTC compiles the candidate. A decision needs only the candidate and the incumbent (and the
commit rule's anchor), so cuDNN and FlashAttention-2 are timed only where they are reported: with
no incumbent (the seed, `python -m avo.bench`), for a candidate the commit rule (avo.commit, the
same test the search applies) would commit, and for a sampled fraction of the rest
(harness.baseline_fraction), which watches for drift; then in a second pass in the same process,
interleaved with the candidate, so every committed version keeps same-run baseline numbers.

Every GPU operation of a worker (loading a module, the checks, a baseline's first call) holds the
device lock shared and every timed stage holds it exclusively (avo.harness.devlock): nothing of
ours runs on the GPU while a kernel is timed.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch

from avo import interrupt
from avo.harness.abi import arch_name
from avo.harness.ahead import NVRTC_S
from avo.harness.benchmark import Bench, benchmark
from avo.harness.check import random_inputs, truth
from avo.harness.devlock import gpu_lock
from avo.harness.launch import Kernel
from avo.harness.nvrtc import Compiled, compile_candidate, compiler, local_memory_error
from avo.harness.reference import REFERENCE, sdpa_baseline
from avo.harness.stopwatch import piece
from avo.harness.timing import sensors
from avo.harness.verify import Checks
from avo.paired import geomean_ratio, screen_out
from avo.types import ConfigResult, EvalResult, Problem, Shape, Status, geomean

LOCK_WAIT = "wait"  # the phase while waiting for the device lock (other workers' checks and timings)
SAVING = "truths"  # the phase while the checks' truths go to the pool (avo.harness.truths)


def device_arch(device: int = 0) -> str:
    return arch_name(*torch.cuda.get_device_capability(device))


def _compiled(source: str, problem: Problem, hc: dict, arch: str, cache_dir, allow_printf: bool,
              checks: Checks | None = None, lock: str | None = None) -> tuple[Compiled, float]:
    """The candidate compiled behind its gates, and the seconds it took; with `checks`, their truths are
    computed on the GPU meanwhile (NVRTC releases the interpreter), until the compiler is done."""
    box: dict = {}

    def work() -> None:
        t0 = time.perf_counter()
        try:
            box["c"] = compile_candidate(source, arch, problem.head_dim, cache_dir, allow_printf,
                                         hc["max_local_bytes"])
        except BaseException as e:  # noqa: BLE001 - raised again in the worker's thread, below
            box["e"] = e
        box["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=work, name="avo-nvrtc", daemon=True)
    thread.start()
    try:
        if checks is not None:
            checks.prepare(lock, stop=lambda: not thread.is_alive())
        thread.join()
    except BaseException:
        # NVRTC cannot be cut short, and a thread inside it when the interpreter exits aborts the process
        # ("exception not rethrown"): a stop signal waits for the compiler first
        thread.join(interrupt.GRACE_S)
        raise
    if "e" in box:
        raise box["e"]
    return box["c"], box["s"]


def prepare(source: str, problem: Problem, hc: dict, arch: str, cache_dir, allow_printf: bool,
            log, lock: str | None = None, checks: Checks | None = None) -> tuple[Kernel | None, EvalResult]:
    """Gates + compile + load. Returns (kernel or None, result with compile fields set).
    arch "auto": the device's own."""
    if arch == "auto":
        arch = device_arch(hc.get("device", 0))
    c, compile_s = _compiled(source, problem, hc, arch, cache_dir, allow_printf, checks, lock)
    early = c.cached and cache_dir is not None and (Path(cache_dir) / NVRTC_S).exists()
    if early:  # compiled ahead (avo.harness.ahead): the lineage records NVRTC's own seconds
        compile_s = float((Path(cache_dir) / NVRTC_S).read_text())
    res = EvalResult(Status.OK, log=c.log[-8000:], registers=c.registers, spill_bytes=c.spill_bytes,
                     stack_bytes=c.stack_bytes, compile_s=compile_s, compiler=compiler(),
                     gpu=torch.cuda.get_device_name(hc.get("device", 0)))
    if not c.ok:
        res.status, res.error = Status.COMPILE_ERROR, c.error or "compile error"
        return None, res
    res.smem_bytes, res.threads = c.launch.smem, c.launch.threads
    with gpu_lock(lock, exclusive=False), piece("module load"):
        kernel = Kernel(c.cubin, hc.get("device", 0))
    local = kernel.attribute("LOCAL_SIZE_BYTES")  # the driver's own figure, whatever ptxas printed
    why = local_memory_error(max(local, res.stack_bytes or 0), False, hc["max_local_bytes"])
    if why:
        res.status, res.error = Status.COMPILE_ERROR, f"rejected after loading: the kernel {why}"
        return None, res
    ahead = f"; {len(checks.truths)} check truths computed meanwhile" if checks is not None else ""
    log(f"compiled for {arch} in {res.compile_s:.2f} s{' ahead' if early else ' (cached)' if c.cached else ''}: "
        f"{res.registers} registers, {res.spill_bytes} spill bytes, {res.stack_bytes} stack bytes, {c.launch}{ahead}")
    return kernel, res


def run_checks(kernel: Kernel, problem: Problem, hc: dict, res: EvalResult, log, checks: Checks | None = None) -> bool:
    t0 = time.perf_counter()
    checks = checks or Checks(problem, hc)
    known = len(checks.truths)
    chk = checks.run(kernel, log)
    res.verify_s = time.perf_counter() - t0
    if not chk.ok:
        res.status, res.error = Status.INCORRECT, chk.message
    log(f"verify: {'ok' if chk.ok else 'FAILED: ' + chk.message} ({chk.checks} runs, {res.verify_s:.2f} s; "
        f"{known} of {len(checks.cases)} truths computed ahead in {checks.ahead_s:.2f} s)")
    return chk.ok


def finish(res: EvalResult, configs: list[ConfigResult], error: tuple[Status, str] | None, sensed: dict,
           bench_s: float) -> None:
    res.configs, res.bench_s = configs, bench_s
    res.sm_clock_mhz, res.power_w = sensed.get("sm_clock_mhz"), sensed.get("power_w")
    if error:
        res.status, res.error = error
        return
    res.ranked, res.score = True, geomean([c.tflops for c in configs])


def _pair(res: EvalResult, bench: Bench, names: list[str]) -> None:
    """Attach the same-run times of the incumbent (and anchor) to the candidate's configs."""
    for name in names:
        for c, o in zip(res.configs, bench.configs.get(name, []), strict=False):
            setattr(c, f"{name}_samples", o.samples)
            setattr(c, f"{name}_tflops", o.tflops)


def would_commit(res: EvalResult, commit: dict | None) -> bool:
    """The search's commit test (avo.commit) on this worker's paired result; True without a rule."""
    if not commit:
        return True
    from avo.commit import decide
    from avo.paired import annotate

    annotate(res, commit["alpha"])
    return decide(res, commit["rule"], commit["min_gain"], commit["config_margin"]) == "committed"


def evaluate(source: str, problem: Problem, hc: dict, arch: str, cache_dir, check_only: bool, log,
             others: dict[str, str] | None = None, phase=lambda name: None, lock: str | None = None,
             commit: dict | None = None, compiled_dir: str | None = None) -> EvalResult:
    """The search's fitness: one candidate, timed side by side with `others` (name -> source:
    the incumbent, and the anchor of the commit rule), after a short paired screen.
    check_only stops after correctness (ranked=False). commit: the search's rule (avo.commit).
    compiled_dir: the candidate compiled ahead (avo.harness.ahead), loaded instead of compiled."""
    phase("compile")
    # the candidate is compiled once (a cache of every candidate would grow by 175 KB an sm90 attempt,
    # without bound), here or ahead; the versions beside it (cache_dir) are compiled for every evaluation they join
    pool = hc.get("truths") or {}  # the inputs drawn from the search's pool (avo.harness.truths), or fresh ones
    checks = Checks(problem, hc, seed=pool.get("seed"), pool=pool.get("dir"))
    with piece("compile"):
        kernel, res = prepare(source, problem, hc, arch, compiled_dir, check_only, log, lock, checks)
    if kernel is None:
        return res
    phase(LOCK_WAIT)  # waiting for the device is no stage of the candidate's: it has no limit of its own
    with gpu_lock(lock, exclusive=False):
        phase("verify")
        with piece("verify"):
            passed = run_checks(kernel, problem, hc, res, log, checks)
        if passed and not check_only:
            with piece("sensors"):
                sensors(hc)  # NVML starts here (if the worker's warm-up did not), not in a timed stage
    phase(SAVING)  # outside the lock, and no stage limit of the candidate's: a slow disk is not its hang
    checks.save()  # the truths are the inputs', whatever the candidate did with them
    if not passed or check_only:
        return res
    kernels = {"candidate": kernel}
    for name, src in (others or {}).items():
        phase("compile")
        with piece(name):
            k2, r2 = prepare(src, problem, hc, arch, cache_dir, False, lambda m, n=name: log(f"{n}: {m}"), lock)
        if k2 is None:
            res.status, res.error = Status.UNAVAILABLE, (f"the {name} no longer passes this harness "
                                                          f"({r2.status.value}: {r2.error}); resume from a version "
                                                          "that does, or start from a seed")
            return res
        kernels[name] = k2
    paired = "incumbent" in kernels
    planned = 0.0 if paired else _first_calls(problem, hc, lock, phase)  # unpaired, the baselines are timed now
    phase(LOCK_WAIT)
    with gpu_lock(lock, exclusive=True):
        if paired and _screened(kernels, problem, hc, res, log, phase):
            return res
        phase("bench")
        t0 = time.perf_counter()
        with piece("bench"):
            b = benchmark(kernels, problem.bench, hc, log, {"candidate"}, baselines=[] if paired else None,
                          reference="incumbent")
        res.stage = "bench"
        finish(res, b.configs["candidate"], b.errors.get("candidate"), b.sensed, planned + time.perf_counter() - t0)
        _pair(res, b, [n for n in kernels if n != "candidate"])
    if paired and res.ok:
        with piece("baselines"):
            _baselines(kernel, problem, hc, res, log, commit, lock, phase)
    return res


def _screened(kernels: dict, problem: Problem, hc: dict, res: EvalResult, log, phase) -> bool:
    """The screen: a short paired run on the cheapest shape of each mask. True: the evaluation ends here
    (the candidate failed a check, or is significantly slower than the incumbent by more than the margin)."""
    screen = hc.get("screen") or {}
    if screen.get("iters", 0) <= 0:
        return False
    phase("screen")
    t0 = time.perf_counter()
    with piece("screen"):
        b = benchmark({n: kernels[n] for n in ("candidate", "incumbent")}, _screen_shapes(problem), hc, log,
                      {"candidate"}, iters=screen["iters"], warmup=1, baselines=[], reference="incumbent")
    res.screen_s = time.perf_counter() - t0
    if "candidate" in b.errors:
        finish(res, b.configs["candidate"], b.errors["candidate"], b.sensed, 0.0)
        return True
    ratio, _ = geomean_ratio([(c.samples, o.samples) for c, o in zip(b.configs["candidate"], b.configs["incumbent"],
                                                                        strict=True)], screen.get("alpha", 0.01))
    log(f"screen: {ratio.ratio:.4f}x the incumbent (one-sided bounds {ratio.lo:.4f}..{ratio.hi:.4f})")
    if not screen_out(ratio, screen.get("margin", 0.02)):
        return False
    res.stage = "screen"
    finish(res, b.configs["candidate"], None, b.sensed, 0.0)
    _pair(res, b, ["incumbent"])
    return True


def _baselines(kernel: Kernel, problem: Problem, hc: dict, res: EvalResult, log, commit: dict | None,
               lock: str | None, phase) -> None:
    """cuDNN and FA2 beside the candidate, for a would-be commit or a sampled drift check (a second pass,
    every launch checked again; a failure there fails the candidate). Their first calls come first, under
    the shared lock (_first_calls); res.bench_s adds the seconds of both, not the waits for the lock."""
    if would_commit(res, commit):
        why = "a would-be commit"
    elif random.random() < hc["baseline_fraction"]:
        why = f"sampled for drift (harness.baseline_fraction={hc['baseline_fraction']})"
    else:
        log("baselines: not timed (no commit; decisions need only the incumbent)")
        return
    log(f"baselines: {', '.join(hc['baselines'])} timed beside the candidate ({why})")
    planned = _first_calls(problem, hc, lock, phase)
    phase(LOCK_WAIT)
    with gpu_lock(lock, exclusive=True):
        phase("bench")
        t0 = time.perf_counter()
        b = benchmark({"candidate": kernel}, problem.bench, hc, log, {"candidate"})
        res.bench_s += planned + time.perf_counter() - t0
    if "candidate" in b.errors:
        res.status, res.error = b.errors["candidate"]
        return
    for c, o in zip(res.configs, b.configs["candidate"], strict=True):
        c.cudnn_tflops, c.fa2_tflops = o.cudnn_tflops, o.fa2_tflops


def _first_calls(problem: Problem, hc: dict, lock: str | None, phase) -> float:
    """The baselines' first call on each benchmark shape, just before they are timed: cuDNN builds its
    execution plans there (0.3 s a shape in a fresh worker, the GPU idle), which inside the timed stage held
    every other worker's timings back. Under the shared lock, as every first call of a baseline, shape by
    shape (a timing waiting for the device takes it in between). Returns the seconds it held the lock."""
    if not hc["baselines"]:
        return 0.0
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    with piece("first calls"):
        _, held = _shape_by_shape(problem.bench, lock, lambda shape: _call_once(shape, hc["baselines"], gen),
                                  phase=phase)
    return held


def _call_once(shape: Shape, baselines, gen, then=None) -> None:
    """Each baseline's first call on fresh inputs of `shape` (then `then(q, k, v)`), finished on the device.
    A refusal is left to the pass or the job that meets it again: they report it."""
    q, k, v = random_inputs(shape, gen)
    for name in baselines:
        try:
            sdpa_baseline(name, q, k, v, shape.causal, 1.0 / shape.head_dim ** 0.5)
        except RuntimeError:
            pass
    if then is not None:
        then(q, k, v)
    torch.cuda.synchronize()


def _shape_by_shape(shapes, lock: str | None, work, stop=lambda: False, phase=None) -> tuple[int, float]:
    """work(shape) for each shape until stop(), each under the shared device lock on its own. Returns the
    shapes done and the seconds the lock was held."""
    n, held = 0, 0.0
    for shape in shapes:
        if stop():
            break
        if phase:
            phase(LOCK_WAIT)
        with gpu_lock(lock, exclusive=False):
            if phase:
                phase("bench")
            t0 = time.perf_counter()
            work(shape)
            held += time.perf_counter() - t0
        n += 1
        time.sleep(0.02)  # flock has no queue: let a timing waiting for the device take it first
    return n, held


def _screen_shapes(problem: Problem) -> tuple[Shape, ...]:
    """The cheapest benchmark shape of each mask: the shortest sequence length."""
    picked = {}
    for s in sorted(problem.bench, key=lambda s: s.flops):
        picked.setdefault(s.causal, s)
    return tuple(picked.values())


def warm_up(problem: Problem, hc: dict, lock: str | None, interrupted) -> int:
    """Pay a fresh worker's one-time costs for `problem` while it waits for its job: NVML, cuBLAS and the
    kernels of the FP32 truth, and the reference baseline's first call, on the cheapest shape of each mask
    (FlashAttention-2 runs the same kernels at every length of a mask, and beside an incumbent it is only a
    fallback: warming every benchmark shape held the device for an estimated 0.1 s a spare, every attempt).
    cuDNN is left cold: it is timed only beside a seed or a would-be commit, and its plans (0.3 s a shape)
    would hold the device from timings for every spare started. Shape by shape under the shared device lock,
    stopping as soon as the job arrives (interrupted()). A refusal of a shape is left for the job to report.
    Returns the number of shapes warmed."""
    with gpu_lock(lock, exclusive=False):
        sensors(hc)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)

    def warm(shape: Shape) -> None:
        _call_once(shape, [REFERENCE], gen, lambda q, k, v: truth(q, k, v, shape.causal, hc["err_mult"], hc["atol"],
                                                                  torch.arange(2, device="cuda")))

    n, _ = _shape_by_shape(_screen_shapes(problem), lock, warm, stop=interrupted)
    torch.cuda.empty_cache()  # idle spares keep nothing of the inputs' memory
    return n
