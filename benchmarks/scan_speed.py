"""How fast avo.analysis reads a large sweep: N runs x M attempts written as the writer compacts them.

    python benchmarks/scan_speed.py [--runs 200] [--attempts 5000] [--chunk 64] [--dir DIR] [--json FILE]

The synthetic sweep is built once (kept in --dir; --rebuild to redo it). Each run's attempts are
written as chunk-*.parquet files of --chunk rows, the layout avo.lineage.compact leaves behind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from avo import lineage, schema
from avo.analysis import load, tables

OUTCOMES = np.array(["committed", "not_faster", "regression", "compile_error", "incorrect", "crashed", "timeout",
                     "invalid"])
P = np.array([0.04, 0.36, 0.05, 0.25, 0.15, 0.05, 0.03, 0.07])
KEYS = [f"{m}_b4_s{s}_h32-8_d128" for m in ("full", "causal") for s in (4096, 16384)]


def synthetic_run(run_dir: Path, i: int, n: int, chunk: int, rng: np.random.Generator) -> None:
    run_id = f"bench{i:04d}"
    group, agent = (4, 8)[i % 2], ("qwen", "gpt_oss")[(i // 2) % 2]
    lineage.write_run_info(run_dir, {"run_id": run_id, "kernel": "gqa", "group": group, "agent": agent,
                                     "overrides": [f"agent={agent}", f"group={group}", f"rng={i}"]})
    outcome = rng.choice(OUTCOMES, size=n, p=P)
    outcome[0] = "seed"
    ok = np.isin(outcome, ["seed", "committed", "not_faster", "regression"])
    committed = np.isin(outcome, ["seed", "committed"])
    best = 300.0 * np.cumprod(np.where(committed, 1 + rng.uniform(0.0, 0.02, n), 1.0))
    score = np.where(ok, np.where(committed, best, best * rng.uniform(0.7, 1.0, n)), np.nan)
    status = np.where(ok, "ok", outcome)
    decision = np.where(ok, np.where(outcome == "committed", "committed", outcome),
                        np.where(outcome == "invalid", "invalid", "failed"))
    decision[0] = "seed"
    step = np.arange(n, dtype=np.int32)
    sources = [f"// {run_id} version {v}\n__global__ void attention() {{ /* tile {v % 7} */ }}\n"
               for v in range(int(committed.sum()))]
    shas = [lineage.write_source(run_dir, src) for src in sources]
    sha = np.array([shas[v] if c else lineage.sha256(f"{run_id}:{s}") for s, c, v in
                    zip(step, committed, np.cumsum(committed) - 1, strict=True)])
    start = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp() * 1e6 + np.cumsum(rng.uniform(30, 120, n)) * 1e6
    configs = [[{"key": k, "tflops": s * (0.8 + 0.1 * j), "ms": 1.0, "ms_p10": 0.95, "ms_p90": 1.05,
                 "cudnn_tflops": 500.0 + 50 * j, "fa2_tflops": 350.0 + 30 * j, "max_err": 2e-3}
                for j, k in enumerate(KEYS)] if not np.isnan(s) else [] for s in score]
    df = pl.DataFrame({
        "schema_version": np.full(n, schema.SCHEMA_VERSION, np.int32), "run_id": [run_id] * n, "step": step,
        "attempt": np.zeros(n, np.int32), "candidate_id": [f"{s:05d}.00" for s in step],
        "version": np.where(committed, np.cumsum(committed) - 1, -1).astype(np.int32),
        "committed": committed, "decision": decision, "status": status, "ranked": np.ones(n, bool),
        "score": score, "source_sha": sha, "operator": ["llm"] * n, "message": [f"attempt {s}" for s in step],
        "error": np.where(ok, "", "error text"),
        "prompt_tokens": rng.integers(4000, 30000, n), "completion_tokens": rng.integers(500, 8000, n),
        "llm_calls": np.ones(n, np.int64), "kernel": ["gqa"] * n, "group": np.full(n, group, np.int32),
        "started_at": start.astype(np.int64), "finished_at": (start + rng.uniform(20, 100, n) * 1e6).astype(np.int64),
    }).with_columns(pl.col("score").fill_nan(None), pl.when(pl.col("version") >= 0).then("version").alias("version"),
                    pl.col("started_at", "finished_at").cast(pl.Datetime("us", "UTC")),
                    pl.Series("configs", configs))
    table = pa.Table.from_pylist(df.to_dicts(), schema=schema.SCHEMA)
    out = lineage.lineage_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    for a in range(0, n, chunk):
        pq.write_table(table.slice(a, chunk), out / f"chunk-s{a:05d}-a00-s{min(a + chunk, n) - 1:05d}-a00.parquet",
                       compression="zstd")


def build(root: Path, runs: int, attempts: int, chunk: int) -> None:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(runs):
        synthetic_run(root / f"{i}", i, attempts, chunk, rng)
        if (i + 1) % 20 == 0:
            print(f"built {i + 1}/{runs} runs ({time.perf_counter() - t:.0f}s)", flush=True)
    (root / ".complete").write_text(json.dumps({"runs": runs, "attempts": attempts, "chunk": chunk}))


def timed(name: str, fn, results: list) -> object:
    t = time.perf_counter()
    value = fn()
    results.append({"step": name, "seconds": round(time.perf_counter() - t, 3)})
    print(f"{name:<34} {results[-1]['seconds']:>8.3f} s", flush=True)
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--attempts", type=int, default=5000)
    p.add_argument("--chunk", type=int, default=lineage.COMPACT_EVERY)
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "avo-scan-bench")
    p.add_argument("--json", type=Path, default=Path("benchmarks/scan_speed.json"))
    p.add_argument("--rebuild", action="store_true")
    a = p.parse_args()
    root = a.dir / f"r{a.runs}-n{a.attempts}-c{a.chunk}"
    if a.rebuild or not (root / ".complete").exists():
        print(f"building the synthetic sweep in {root}", flush=True)
        build(root, a.runs, a.attempts, a.chunk)
    files = sum(1 for _ in root.glob("*/lineage/chunk-*.parquet"))
    print(f"{a.runs} runs x {a.attempts} attempts = {a.runs * a.attempts:,} rows in {files:,} files")
    res: list = []
    lin = timed("load (discover, check schemas)", lambda: load([root]), res)
    rows = timed("read files (tables.attempts)", lambda: tables.attempts(lin).select(pl.len()).collect().item(), res)
    assert rows == a.runs * a.attempts, rows
    runs = timed("runs_summary", lambda: tables.runs_summary(lin), res)
    timed("sweep_summary", lambda: tables.sweep_summary(lin, runs=runs), res)
    timed("commits", lambda: tables.commits(lin).collect(), res)
    timed("best_configs", lambda: tables.best_configs(lin).collect(), res)
    total = round(sum(r["seconds"] for r in res), 3)
    print(f"{'total':<34} {total:>8.3f} s")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"runs": a.runs, "attempts": a.attempts, "rows": rows, "files": files,
                                  "chunk": a.chunk, "steps": res, "total_s": total,
                                  "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0],
                                  "polars": pl.__version__, "python": platform.python_version()}, indent=1))
    print(f"saved {a.json} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
