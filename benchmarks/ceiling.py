"""How close a kernel runs to what this GPU's tensor cores deliver: the kernel, cuDNN and a large BF16 GEMM,
timed interleaved in one process.

    python benchmarks/ceiling.py [--seed sm90] [--gemm 8192] [--json FILE] [-- overrides]

The dense peak (989 TFLOPS on an H100 or H200) is not what a power- and clock-limited part sustains, so a ratio to
cuDNN says nothing about the headroom left. A square BF16 GEMM through cuBLAS is the practical ceiling of the
tensor cores on this machine at this moment: attention at head dim 128 runs the same wgmma instructions with a
softmax between them, and cannot pass it. Each benchmark shape of the problem (default: kernel=mha) is timed with
the search's one protocol (avo.harness.timing: same stream, L2 flushed, random order every iteration) beside cuDNN
and the GEMM, so the three share the clocks of that shape's seconds. The kernel's outputs are not checked here:
it is a seed (`--seed`, avo.seeds) that passed the harness.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", default="sm90", help="the kernel (avo.seeds: a kernel name, a file or a run)")
    ap.add_argument("--gemm", type=int, default=8192, help="M = N = K of the BF16 GEMM")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "ceiling_results.json")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m avo.bench")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ceiling.py: no CUDA GPU here (torch.cuda.is_available() is False)")
    from avo.bench import compose
    from avo.fsutil import atomic_write_json
    from avo.harness.evaluate import device_arch
    from avo.harness.launch import Kernel
    from avo.harness.nvrtc import compile_candidate
    from avo.harness.timing import Timer
    from avo.problem import problem_from_cfg
    from avo.seeds import resolve

    cfg = compose(list(args.overrides))
    problem = problem_from_cfg(cfg.kernel)
    seed = resolve(args.seed)
    c = compile_candidate(seed.source, device_arch(), problem.head_dim)
    if not c.ok:
        raise SystemExit(f"ceiling.py: {args.seed} does not compile here: {c.error}")
    kernel = Kernel(c.cubin, 0)
    n = args.gemm
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=gen)
    c_out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    timer, rng, rows = Timer(), random.Random(0), []
    print(f"{torch.cuda.get_device_name()}: {args.seed} ({c.registers} registers), cuDNN, and a {n}^3 BF16 GEMM")
    print(f"{'shape':34s} {'kernel':>7s} {'cuDNN':>7s} {'GEMM':>7s}  "
          f"{'k/cuDNN':>7s} {'k/GEMM':>7s} {'cuDNN/GEMM':>10s}")
    for shape in problem.bench:
        tf = _time_shape(shape, kernel, lambda: torch.mm(a, b, out=c_out), 2.0 * n ** 3, timer, rng, gen, args.budget)
        rows.append({"shape": shape.key, "causal": shape.causal, **{f"{k}_tflops": round(t, 1) for k, t in tf.items()}})
        print(f"{shape.key:34s} {tf['kernel']:7.1f} {tf['cudnn']:7.1f} {tf['gemm']:7.1f}  "
              f"{tf['kernel'] / tf['cudnn']:7.3f} {tf['kernel'] / tf['gemm']:7.3f} {tf['cudnn'] / tf['gemm']:10.3f}")
        torch.cuda.empty_cache()
    atomic_write_json(args.json, {"gpu": torch.cuda.get_device_name(), "seed": args.seed, "gemm_n": n,
                                  "problem": problem.name, "rows": rows})
    print(f"saved {args.json}")
    return 0


def _time_shape(shape, kernel, gemm, gemm_flops: float, timer, rng, gen, budget_s: float) -> dict[str, float]:
    """TFLOPS of the kernel, cuDNN and the GEMM on one shape, timed interleaved."""
    from avo.harness.check import Outputs, random_inputs
    from avo.harness.reference import sdpa_baseline

    q, k, v = random_inputs(shape, gen)
    out = Outputs(shape)
    fns = {"kernel": lambda: kernel(q, k, v, out.o, out.lse, shape.causal),
           "cudnn": sdpa_baseline("cudnn", q, k, v, shape.causal, 1.0 / shape.head_dim ** 0.5), "gemm": gemm}
    stats = timer.interleaved(fns, warmup=3, iters=50, budget_s=budget_s, rng=rng)
    flops = {"kernel": shape.flops, "cudnn": shape.flops, "gemm": gemm_flops}
    tf = {name: flops[name] / (stats[name].ms * 1e-3) / 1e12 for name in fns}
    return tf  # the shape's buffers go with this frame


if __name__ == "__main__":
    sys.exit(main())
