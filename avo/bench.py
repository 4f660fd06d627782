"""Benchmark seed kernels against cuDNN and FlashAttention-2 with the search's own harness.

    python -m avo.bench kernel=mha seed=naive
    python -m avo.bench kernel=gqa group=8 'seeds=[naive,sm80]' out=outputs/bench/x
    python -m avo.bench kernel=mha seed=sm90 profile=first   # Nsight Compute instead of timing

A Hydra app on conf/bench.yaml, which is conf/config.yaml plus `seeds`, `out` and `profile`, so the
shapes, tolerances and timing protocol are exactly those a search with the same overrides would use. All seeds are
verified, then timed interleaved with the baselines in one worker process. Writes bench.json
and bench.parquet (one row per seed and shape) to `out`. `profile=<shape key>` (or `first`) prints the
agent's profile summary of each seed on that shape and keeps ncu's report in `out/jobs`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

from avo.fsutil import atomic_write_json
from avo.types import EvalResult


def compose(overrides: list[str]):
    """The config `python -m avo.bench <overrides>` runs with (for scripts and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from avo.config import register
    from avo.paths import CONF_DIR

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("bench", overrides=overrides, return_hydra_config=False)


def seeds(cfg) -> dict:
    """The seeds to time, by name: `seeds`, else `seed` (avo.seeds: a run directory gives its best)."""
    from avo.seeds import resolve

    return {s.name: s for s in (resolve(spec) for spec in (list(cfg.seeds) or [str(cfg.seed)]))}


def origins(seeds: dict) -> dict:
    """Where each seed came from: a run's version (what avo.analyze --bench matches), or its spec."""
    return {n: {"run_dir": str(Path(s.run_dir).resolve()), "version": s.version} if s.run_dir is not None else
            {"spec": s.origin} for n, s in seeds.items()}


def _follow(path: Path, done: threading.Event) -> None:
    """Echo the worker's log as it grows (the worker prints one line per step)."""
    pos = 0
    while True:
        finished = done.is_set()
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if finished:
            return
        done.wait(0.5)


def print_table(problem, results: dict[str, EvalResult]) -> None:
    names = [n for n, r in results.items() if r.configs]
    head = f"{'shape':<36}" + "".join(f"{n[:14]:>15}" for n in names) + f"{'cuDNN':>9}{'FA2':>9}" + \
        "".join(f"{'/cuDNN ' + n[:7]:>15}" for n in names)
    print(head)
    print("-" * len(head))
    for i, shape in enumerate(problem.bench):
        cfgs = [results[n].configs[i] if i < len(results[n].configs) else None for n in names]
        ref = next((c for c in cfgs if c is not None), None)
        fmt = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
        print(f"{shape.key:<36}" + "".join(f"{fmt(c.tflops if c else None):>15}" for c in cfgs)
              + f"{fmt(ref.cudnn_tflops if ref else None):>9}{fmt(ref.fa2_tflops if ref else None):>9}"
              + "".join(f"{(f'{c.vs_cudnn:.3f}' if c and c.vs_cudnn else '-'):>15}" for c in cfgs))
    for n, r in results.items():
        score = f"{r.score:.1f} TFLOPS geomean" if r.score else "no score"
        print(f"{n}: {r.status.value}, {score}; compile {r.compile_s:.2f} s, verify {r.verify_s:.2f} s, "
              f"bench {r.bench_s:.2f} s" + (f"; {r.error}" if r.error else ""))


def write_outputs(out: Path, problem, results: dict[str, EvalResult], meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic_write_json(out / "bench.json", {"meta": meta, "results": {n: r.to_dict() for n, r in results.items()}})
    rows = []
    for n, r in results.items():
        for c in r.configs:
            scalars = {k: v for k, v in vars(c).items() if not isinstance(v, list)}  # one row: avo.types.ConfigResult
            rows.append({"seed": n, "status": r.status.value, "gpu": r.gpu, **scalars, "vs_cudnn": c.vs_cudnn,
                         "sm_clock_mhz": r.sm_clock_mhz, "power_w": r.power_w,
                         **{k: v for k, v in meta.items() if k not in ("seeds", "origins")}})
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out / "bench.parquet")


def run(cfg, out: Path) -> int:
    from avo.harness.gpu import GpuHarness
    from avo.harness.job import write_sources
    from avo.harness.sandbox import run_worker
    from avo.problem import problem_from_cfg

    problem = problem_from_cfg(cfg.kernel)
    chosen = seeds(cfg)
    print(f"bench: {problem.name} ({problem.heads_q}/{problem.heads_kv} heads, d{problem.head_dim}), "
          f"{len(problem.bench)} shapes, seeds {list(chosen)} -> {out}", flush=True)
    for seed in chosen.values():
        seed.check(problem.head_dim, cfg.harness.arch)
        if seed.note:
            print(f"bench: {seed.note}", flush=True)
    harness = GpuHarness(cfg.harness, out / "jobs", spare=False)
    if cfg.profile:
        return _profile(harness, problem, chosen, None if cfg.profile == "first" else cfg.profile)
    job_dir = out / "jobs" / ("bench-" + hashlib.sha256(json.dumps(sorted(chosen)).encode()).hexdigest()[:12])
    sources = write_sources(job_dir, {name: seed.source for name, seed in chosen.items()})
    harness.job(problem, "bench", sources=sources).write(job_dir)
    print(f"bench: worker log at {job_dir / 'worker.log'}", flush=True)
    done = threading.Event()
    tail = threading.Thread(target=_follow, args=(job_dir / "worker.log", done), daemon=True)
    tail.start()
    try:
        summary = run_worker(job_dir, cfg.harness.timeout_s * len(chosen), env=harness.env())
    finally:
        done.set()
        tail.join()
    if not (job_dir / "bench.json").exists():
        print(f"bench: the worker failed: {summary.status.value}: {summary.error}", file=sys.stderr)
        return 1
    results = {n: EvalResult.from_dict(d) for n, d in json.loads((job_dir / "bench.json").read_text()).items()}
    meta = {"kernel": problem.name, "group": int(cfg.group), "arch": harness.arch, "seeds": list(chosen),
            "origins": origins(chosen), "timestamp": time.strftime("%Y-%m-%d_%H-%M-%S")}
    write_outputs(out, problem, results, meta)
    print_table(problem, results)
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.parquet'}")
    return 0 if summary.ok else 2


def _profile(harness, problem, seeds: dict, shape: str | None) -> int:
    from avo.harness.profile import ProfileError

    failed = 0
    for s, seed in seeds.items():
        print(f"== {s}", flush=True)
        try:
            print(harness.profile(seed.source, problem, shape))
        except ProfileError as e:
            print(f"bench: no profile of {s}: {e}", file=sys.stderr)
            failed += 1
    print(f"bench: ncu reports (profile.ncu-rep) under {harness.work_dir}")
    return 2 if failed else 0


def _app():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from avo.config import register, validate
    from avo.errors import USER_ERRORS, one_line

    register()

    @hydra.main(version_base=None, config_path="../conf", config_name="bench")
    def main(cfg) -> None:
        try:
            validate(cfg, check_seed=False)  # run() checks each of `seeds` instead
            rc = run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except (*USER_ERRORS, OSError) as e:
            line = one_line(e, USER_ERRORS)
            if line is None:
                raise
            print(f"avo.bench: error: {line}", file=sys.stderr, flush=True)
            rc = 2
        sys.exit(rc)  # Hydra drops the task's return value

    return main


if __name__ == "__main__":
    _app()()
