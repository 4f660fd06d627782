"""Worker-side GPU evaluation: static gate, compile, verify, time against baselines, re-check.

`evaluate` serves the search (one candidate); `benchmark` serves both the search and
`python -m avo.bench` (several candidates timed interleaved in one process), so the numbers
the search commits on and the numbers reported are measured by the same code.
"""
from __future__ import annotations

import time

import torch

from avo.harness.check import Outputs, compare, random_inputs, verify
from avo.harness.launch import Kernel
from avo.harness.nvrtc import compile_source
from avo.harness.reference import sdpa_baseline
from avo.harness.static import check_source
from avo.harness.timing import Sensors, Timer, hidden_work
from avo.types import ConfigResult, EvalResult, Problem, Shape, Status, geomean

RECHECK_ROWS = 128  # query rows re-checked against the reference in every timed output


def device_arch(device: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def prepare(source: str, problem: Problem, hc: dict, arch: str, cache_dir, allow_printf: bool,
            log) -> tuple[Kernel | None, EvalResult]:
    """Static gate + compile + load. Returns (kernel or None, result with compile fields set)."""
    why = check_source(source, allow_printf=allow_printf)
    if why:
        return None, EvalResult(Status.COMPILE_ERROR, error=f"rejected before compiling: {why}")
    t0 = time.perf_counter()
    c = compile_source(source, arch, problem.head_dim, cache_dir)
    res = EvalResult(Status.OK, log=c.log[-8000:], registers=c.registers, spill_bytes=c.spill_bytes,
                     stack_bytes=c.stack_bytes, compile_s=time.perf_counter() - t0,
                     gpu=torch.cuda.get_device_name(hc.get("device", 0)))
    if not c.ok:
        res.status, res.error = Status.COMPILE_ERROR, c.error or "compile error"
        return None, res
    res.smem_bytes, res.threads = c.launch.smem, c.launch.threads
    kernel = Kernel(c.cubin, c.launch, hc.get("device", 0))
    if res.registers is None:  # some NVRTC builds return no ptxas report: ask the loaded function
        res.registers = kernel.attribute("NUM_REGS")
        res.stack_bytes = kernel.attribute("LOCAL_SIZE_BYTES")
    log(f"compiled for {arch} in {res.compile_s:.2f} s{' (cached)' if c.cached else ''}: "
        f"{res.registers} registers, {res.spill_bytes} spill bytes, {res.stack_bytes} stack bytes, {c.launch}")
    return kernel, res


def run_checks(kernel: Kernel, problem: Problem, hc: dict, res: EvalResult, log) -> bool:
    t0 = time.perf_counter()
    chk = verify(kernel, problem.check, hc["check_seeds"], hc["err_mult"], hc["atol"], log=log)
    res.verify_s = time.perf_counter() - t0
    if not chk.ok:
        res.status, res.error = Status.INCORRECT, chk.message
    log(f"verify: {'ok' if chk.ok else 'FAILED: ' + chk.message} ({chk.checks} runs, {res.verify_s:.2f} s)")
    return chk.ok


def _recheck(out: Outputs, q, k, v, shape: Shape, hc: dict, gen) -> tuple[str, float | None]:
    """The last timed output must be fully written and correct (on sampled rows): (problem, max err)."""
    if not out.guards_intact():
        return "wrote outside O or LSE while timed", None
    if torch.isnan(out.o).any() or torch.isnan(out.lse).any():
        return "left output elements unwritten (NaN) while timed", None
    rows = torch.randperm(shape.seqlen_q, generator=gen, device="cuda")[:RECHECK_ROWS]
    rows = torch.unique(torch.cat([rows, torch.tensor([0, shape.seqlen_q - 1], device="cuda")]))
    ok, err, msg = compare(out.o, out.lse, q, k, v, shape.causal, hc["err_mult"], hc["atol"], 1e-3, rows=rows)
    return ("" if ok else f"timed output wrong: {msg}"), err


def benchmark(kernels: dict[str, Kernel], problem: Problem, hc: dict, log) -> tuple[dict, dict, dict]:
    """Time every kernel and baseline on every bench shape, interleaved.

    Returns (configs per kernel name, (status, message) per failed kernel name, sensor means).
    """
    timer, sensors = Timer(hc["flush_l2"]), Sensors(hc.get("device", 0))
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
    configs = {n: [] for n in kernels}
    errors: dict[str, tuple[Status, str]] = {}
    clocks, powers = [], []
    budget = hc.get("bench_budget_s", 2.0)
    for i, shape in enumerate(problem.bench, 1):
        q, k, v = random_inputs(shape, gen)
        outs, fns, prep, qs = {}, {}, {}, {}
        for name, kern in kernels.items():
            if name in errors:
                continue
            # Each candidate gets its own Q, refilled with new random numbers before every timed
            # call, and its outputs re-poisoned: skipping work, or replaying a result cached by
            # pointer, leaves NaN or a stale answer for the re-check to find.
            out, qc = Outputs(shape), torch.empty_like(q)
            outs[name], qs[name] = out, qc
            prep[name] = (lambda out=out, qc=qc: (qc.normal_(generator=gen), out.poison()))
            fns[name] = (lambda kern=kern, out=out, qc=qc, k=k, v=v, causal=shape.causal:
                         kern(qc, k, v, out.o, out.lse, causal))
        for b in hc["baselines"]:
            try:
                fns[b] = sdpa_baseline(b, q, k, v, shape.causal)
            except RuntimeError as e:
                log(f"  baseline {b} unavailable for {shape.key}: {str(e).splitlines()[0]}")
        stats = timer.interleaved(fns, hc["warmup"], hc["iters"], budget, prep=prep)
        clock, power = sensors.read()
        if clock is not None:
            clocks.append(clock)
            powers.append(power)
        base = {b: shape.flops / (stats[b].ms * 1e9) for b in hc["baselines"] if b in stats}
        for name in outs:
            st = stats[name]
            tflops = shape.flops / (st.ms * 1e9)
            # the most specific diagnosis wins: a wrong timed output, then hidden work, then speed
            problem_msg, max_err = _recheck(outs[name], qs[name], k, v, shape, hc, gen)
            status = Status.INCORRECT
            wall = Timer.wall_ms(fns[name], max(1, min(5, int(0.25 * budget * 1e3 / max(st.ms, 1e-3)))))
            if not problem_msg and hidden_work(st.ms, wall):
                problem_msg, status = (f"host wall-clock {wall:.3f} ms per call vs {st.ms:.3f} ms on the launch "
                                       "stream: work runs outside the launched grid"), Status.ERROR
            elif not problem_msg and tflops > hc["roofline_tflops"]:
                problem_msg, status = f"{tflops:.0f} TFLOPS is above the {hc['roofline_tflops']} roofline", Status.ERROR
            if problem_msg:
                errors[name] = (status, f"{shape.key}: {problem_msg}")
            configs[name].append(ConfigResult(shape.key, tflops, st.ms, st.ms_p10, st.ms_p90,
                                              base.get("cudnn"), base.get("flash"), max_err))
            log(f"  [{i}/{len(problem.bench)}] {shape.key} {name}: {tflops:7.1f} TFLOPS "
                f"({st.ms:.3f} ms, p10 {st.ms_p10:.3f}, p90 {st.ms_p90:.3f}, n={st.n}, wall {wall:.3f})"
                + (f"  ERROR {problem_msg}" if problem_msg else ""))
        log(f"  [{i}/{len(problem.bench)}] {shape.key} baselines: "
            + ", ".join(f"{b} {t:.1f} TFLOPS" for b, t in base.items())
            + (f"; SM {clock:.0f} MHz, {power:.0f} W" if clock is not None else ""))
        del q, k, v, outs, fns, prep, qs
    sensed = {"sm_clock_mhz": sum(clocks) / len(clocks) if clocks else None,
              "power_w": sum(powers) / len(powers) if powers else None}
    return configs, errors, sensed


def finish(res: EvalResult, configs: list[ConfigResult], error: tuple[Status, str] | None, sensed: dict,
           bench_s: float) -> None:
    res.configs, res.bench_s = configs, bench_s
    res.sm_clock_mhz, res.power_w = sensed["sm_clock_mhz"], sensed["power_w"]
    if error:
        res.status, res.error = error
        return
    res.ranked, res.score = True, geomean([c.tflops for c in configs])


def evaluate(source: str, problem: Problem, hc: dict, arch: str, cache_dir, check_only: bool, log) -> EvalResult:
    """The search's fitness: one candidate; check_only stops after correctness (ranked=False)."""
    if arch == "auto":
        arch = device_arch(hc.get("device", 0))
    kernel, res = prepare(source, problem, hc, arch, cache_dir, allow_printf=check_only, log=log)
    if kernel is None or not run_checks(kernel, problem, hc, res, log) or check_only:
        return res
    t0 = time.perf_counter()
    configs, errors, sensed = benchmark({"candidate": kernel}, problem, hc, log)
    finish(res, configs["candidate"], errors.get("candidate"), sensed, time.perf_counter() - t0)
    return res
