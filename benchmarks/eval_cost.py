"""What one evaluation costs, piece by piece, on this machine's GPU.

    python benchmarks/eval_cost.py [--evals 3] [--json FILE] [--by-shape] [--seed sm90] [-- overrides]

In one process, as a worker would run them (avo.harness.evaluate, the search's own code path):
- a spare's warm-up (evaluate.warm_up) and, in a fresh process, a CUDA context's start-up;
- N full paired evaluations of the seed against itself as the incumbent (evaluate(..., others={"incumbent":
  seed})): the candidate compiled by NVRTC with the FP32 check truths computed meanwhile, verify, the
  incumbent from the cubin cache, the screen, the benchmark and the baseline pass (the baselines' first calls
  under the shared lock, then the pass). The baselines are timed in every evaluation here (no commit rule);
  the search times them only beside a would-be commit and harness.baseline_fraction of the rest;
- one more evaluation with the stopwatch off: the real total, and the stage clocks the lineage records;
- the context's reset, which every worker does before it exits (worker.release_gpu).
Each piece is timed between device-wide synchronizes (avo.harness.stopwatch), so its GPU work is its own,
and the sum runs a little over the real total (nothing overlaps). The first evaluation is as cold as a
worker's job; later ones reuse cuDNN's plans and the allocator's memory. The timed kernels' own time, by
CUDA events of the timed iterations, is given beside. Hydra overrides (kernel=gqa, harness.iters=...) as
for `python -m avo.bench`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avo.harness import stopwatch  # noqa: E402

CONTEXT = ("import time, torch; t = time.perf_counter(); torch.empty(1, device='cuda'); torch.cuda.synchronize(); "
           "print(time.perf_counter() - t)")
EXCLUSIVE = ("screen", "bench", "baselines")          # stages under the exclusive device lock, but:
SHARED = ("compile/draw", "compile/truth", "compile/module load", "verify", "incumbent/module load", "sensors",
          "baselines/first calls")


def need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("eval_cost.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on the GPU "
                         "machine: bash benchmarks/cost_device.sh")
    from avo.harness.nvrtc import nvrtc_version

    try:
        nvrtc_version()
    except RuntimeError as e:
        raise SystemExit(f"eval_cost.py: {e}") from None


def held(totals: dict, names: tuple[str, ...]) -> float:
    """Seconds of the evaluation's pieces named `names` (a path under evaluation/, or its start: "compile/truth"
    is every truth computed ahead and its move to the host), without counting a piece inside another twice."""
    return sum(s for path, (_, s) in totals.items()
               if any(path.startswith(f"evaluation/{n}") and path.count("/") == 1 + n.count("/") for n in names))


def one(source: str, problem, hc: dict, arch: str, cache: str, log, watch: bool):
    """One paired evaluation of `source` against itself: (result, wall s, the stopwatch's totals)."""
    import torch

    from avo.harness.evaluate import evaluate

    sw = stopwatch.start(torch.cuda.synchronize) if watch else None
    t0 = time.perf_counter()
    try:
        with stopwatch.piece("evaluation"):
            res = evaluate(source, problem, hc, arch, cache, False, log, {"incumbent": source})
    finally:
        stopwatch.stop()
    return res, time.perf_counter() - t0, (sw.totals if sw else {})


def release(device: int) -> float:
    """The seconds of worker.release_gpu's reset of the primary context. torch cannot use the GPU afterwards."""
    from avo.harness.worker import reset_context

    t0 = time.perf_counter()
    reset_context(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evals", type=int, default=3, help="instrumented evaluations")
    p.add_argument("--seed", default="sm90")
    p.add_argument("--json", type=Path, help="write every piece's totals, per evaluation too")
    p.add_argument("--by-shape", action="store_true", help="a row per benchmark shape (default: summed)")
    p.add_argument("--log", type=Path, help="the evaluations' log lines")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml (kernel, harness.*)")
    a = p.parse_args()
    need_cuda()
    import torch

    from avo.bench import compose
    from avo.harness import _plain
    from avo.harness.evaluate import device_arch, warm_up
    from avo.harness.nvrtc import compile_candidate
    from avo.problem import problem_from_cfg
    from avo.seeds import resolve

    cfg = compose(a.overrides)
    problem, source = problem_from_cfg(cfg.kernel), resolve(a.seed).source
    hc = {**_plain(cfg.harness), "device": 0, "device_uuid": ""}
    lines: list[str] = []
    ctx = subprocess.run([sys.executable, "-c", CONTEXT], capture_output=True, text=True, check=True)
    process = {"process/context start-up": [1, float(ctx.stdout.split()[-1])]}
    torch.cuda.set_device(0)
    torch.empty(1, device="cuda")
    t0 = time.perf_counter()
    warmed = warm_up(problem, hc, None, lambda: False)
    torch.cuda.synchronize()
    process["process/spare warm-up"] = [warmed, time.perf_counter() - t0]
    cache = tempfile.mkdtemp(prefix="avo-eval-cost-")  # the incumbent's cubin, cached as in the search
    arch = device_arch(0) if hc["arch"] == "auto" else hc["arch"]
    compile_candidate(source, arch, problem.head_dim, cache, False, hc["max_local_bytes"])
    per_eval, results = [], []
    for i in range(a.evals + 1):
        watch = i < a.evals
        res, wall, totals = one(source, problem, hc, arch, cache, lines.append, watch)
        if not res.ok:
            sys.stdout.write("\n".join(lines[-40:]) + "\n")
            raise SystemExit(f"eval_cost.py: evaluation {i + 1} is {res.status.value}: {res.error}")
        events = {n: sum(sum(getattr(c, f) or []) for c in res.configs) / 1e3
                  for n, f in (("candidate", "samples"), ("incumbent", "incumbent_samples"))}
        results.append({"instrumented": watch, "wall_s": wall, "compile_s": res.compile_s, "verify_s": res.verify_s,
                        "screen_s": res.screen_s, "bench_s": res.bench_s, "timed_kernels_s": events})
        if watch:
            per_eval.append(totals)
    process["process/context reset"] = [1, release(0)]
    report(per_eval, results, process, a.by_shape, a.json, problem)
    if a.log:
        a.log.write_text("\n".join(lines) + "\n")


def report(per_eval: list[dict], results: list[dict], process: dict, by_shape: bool, out: Path | None,
           problem) -> None:
    total = stopwatch.summed(per_eval)
    n = len(per_eval)
    table = stopwatch.rows(stopwatch.merged(total, by_shape), n)
    # every attempt of the search runs in its own worker process: these are paid once an attempt
    mean = total["evaluation"][1] / n
    once = stopwatch.rows(process, 1, base=mean)
    print(f"eval_cost: {problem.name}, {len(problem.bench)} benchmark shapes, {n} instrumented evaluations\n")
    print(stopwatch.render(table))
    print(f"\nper worker process, once an attempt (share: of the mean instrumented evaluation, {mean:.3f} s)")
    print(stopwatch.render(once))
    merged = stopwatch.merged(total)
    exclusive = (held(merged, EXCLUSIVE) - held(merged, ("baselines/first calls",))) / n
    shared = held(merged, SHARED) / n
    base = merged.get("evaluation/baselines", [0, 0.0])[1] / n
    print(f"\nper evaluation: exclusive lock {exclusive:.3f} s (of it the baseline pass {base:.3f} s, timed in the "
          f"search only beside a would-be commit and a sampled fraction), shared lock {shared:.3f} s")
    for i, r in enumerate(results, 1):
        k = r["timed_kernels_s"]
        print(f"evaluation {i}{'' if r['instrumented'] else ' (stopwatch off)'}: {r['wall_s']:.2f} s; compile "
              f"{r['compile_s']:.2f}, verify {r['verify_s']:.2f}, screen {r['screen_s']:.2f}, bench {r['bench_s']:.2f}"
              f" (timed iterations by CUDA events: candidate {k['candidate']:.3f} s, incumbent {k['incumbent']:.3f} s)")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "problem": problem.name, "evaluations": n,
            "rows": [vars(r) for r in table + once], "per_evaluation": per_eval, "process": process,
            "results": results, "exclusive_s": exclusive, "shared_s": shared, "baselines_s": base}, indent=1))
        print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
