"""Host overhead of an exported op per call, against launching the same cubin the harness's way.

    PYTHONPATH=. python benchmarks/export_overhead.py [--kernel sm90] [--out result.json]

Both paths launch the same kernel on the same stream; the harness path reuses preallocated
outputs (avo.harness.launch.Kernel), the exported op allocates out, lse and the tile counter and
validates its inputs each call. Per shape: GPU time per call (CUDA events around N back-to-back
calls) and host time per call (the loop's wall time before synchronising).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from avo.export import export
from avo.harness.launch import Kernel
from avo.harness.nvrtc import compile_source

SHAPES = [(1, 128, 16), (1, 1024, 16), (8, 4096, 16), (1, 32768, 16)]  # (batch, seqlen, heads), d=128


def per_call(fn, n: int) -> tuple[float, float]:
    """(GPU ms, host ms) per call over n back-to-back calls after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) * 1e3 / n
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n, host


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="sm90")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    export(args.kernel, tmp / "bench_pkg", head_dims=[128])
    sys.path.insert(0, str(tmp))
    pkg = importlib.import_module("bench_pkg")
    major, minor = torch.cuda.get_device_capability()
    c = compile_source((tmp / "bench_pkg" / "kernel.cu").read_text(), f"sm_{major}{minor}{'a' if major >= 9 else ''}",
                       128)
    direct = Kernel(c.cubin, c.launch, torch.cuda.current_device())
    compiled = torch.compile(lambda q, k, v: pkg.attention(q, k, v, causal=True), fullgraph=True)
    rows = []
    print(f"{torch.cuda.get_device_name()}, kernel {args.kernel}, causal, head_dim 128", flush=True)
    print(f"{'shape':>18} | {'path':>16} | {'GPU us/call':>11} | {'host us/call':>12}", flush=True)
    for b, s, h in SHAPES:
        q, k, v = (torch.randn(b, s, h, 128, device="cuda").bfloat16() for _ in range(3))
        o, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
        n = max(20, min(2000, int(2e4 / s)))
        paths = {"harness Kernel": lambda q=q, k=k, v=v, o=o, lse=lse: direct(q, k, v, o, lse, True),
                 "exported op": lambda q=q, k=k, v=v: pkg.attention(q, k, v, causal=True),
                 "exported+compile": lambda q=q, k=k, v=v: compiled(q, k, v)}
        for name, fn in paths.items():
            gpu, host = per_call(fn, n)
            rows.append({"batch": b, "seqlen": s, "heads": h, "path": name, "gpu_us": gpu * 1e3, "host_us": host * 1e3,
                         "calls": n})
            print(f"{f'b{b} s{s} h{h}':>18} | {name:>16} | {gpu * 1e3:11.1f} | {host * 1e3:12.1f}", flush=True)
        direct(q, k, v, o, lse, True)
        torch.testing.assert_close(pkg.attention(q, k, v, causal=True), o)  # the same kernel, the same answer
    print("host cost of the pieces (us/call):", flush=True)
    q, k, v = (torch.randn(1, 1024, 16, 128, device="cuda").bfloat16() for _ in range(3))
    o, lse, tc = torch.empty_like(q), torch.empty(1, 16, 1024, device="cuda"), torch.zeros(1, device="cuda")
    abi = pkg._abi
    pieces = {"validate (exported op)": lambda: pkg._validate(q, k, v),
              "encode 1 TMA map, uncached": lambda: (abi._TMA_CACHE.clear(), abi.encode_tma(q, 128)),
              "pack_params, maps cached": lambda: abi.pack_params(q, k, v, o, lse, True, 132, tc, direct.spec),
              "torch.zeros(1) tile counter": lambda: torch.zeros(1, dtype=torch.int32, device="cuda"),
              "empty out + lse": lambda: (torch.empty_like(q), torch.empty(1, 16, 1024, device="cuda"))}
    for name, fn in pieces.items():
        _, host = per_call(fn, 2000)
        rows.append({"piece": name, "host_us": host * 1e3})
        print(f"  {name:>28}: {host * 1e3:7.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "kernel": args.kernel,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
