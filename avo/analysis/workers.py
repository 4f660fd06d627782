"""Runs with several workers (search.workers) or islands (search.islands): attempts per worker and per island,
the GPU's busy fraction, commits over time.

Wall time here is the union of the attempts' spans (what the search budget counts), not their sum,
over the search's steps: the seed's evaluation, which runs before any operator, is left out of the
rates (benchmarks/workers_throughput.py reports these same numbers).
The GPU's busy fraction is read from the recorded stage times: `timed` (screen and benchmark, which
hold the device lock alone) is exact to the lock; `busy` adds the correctness checks, which may
share the GPU with each other, so it can overstate a little when checks overlap. A migrant (a copy of
another island's best, avo.islands) is counted apart: it is neither an attempt nor a commit.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from avo.analysis.reader import Lineage
from avo.lineage import MIGRATED, STAGE_COLUMNS
from avo.workers import busy_seconds

COLUMNS = ("run_id", "step", "worker", "island", "committed", "decision", "status", "version", "score", "started_at",
           "finished_at", "propose_s", *STAGE_COLUMNS, "prompt_tokens", "completion_tokens")


def _rows(lin: Lineage) -> pl.DataFrame:
    return lin.attempts.select(*COLUMNS).collect().with_columns(pl.col("worker", "island").fill_null(0),
                                                                migrant=pl.col("decision").eq_missing(MIGRATED))


def _wall(rows: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame([{"run_id": r, "wall_s": busy_seconds(d)} for (r,), d in rows.group_by("run_id")],
                        schema={"run_id": pl.String, "wall_s": pl.Float64})


def gpu_busy(lin: Lineage) -> pl.DataFrame:
    """Per run: workers, islands, wall hours, attempts per hour, the fraction of wall time the GPU was timing/busy."""
    rows = _rows(lin).filter(pl.col("step") > 0)
    per = rows.group_by("run_id").agg(
        workers=pl.col("worker").n_unique(), islands=pl.col("island").n_unique(),
        attempts=(~pl.col("migrant")).sum(),
        timed_s=(pl.col("screen_s").fill_null(0) + pl.col("bench_s").fill_null(0)).sum(),
        gpu_s=(pl.col("verify_s").fill_null(0) + pl.col("screen_s").fill_null(0) + pl.col("bench_s").fill_null(0))
        .sum(), tokens=(pl.col("prompt_tokens").fill_null(0) + pl.col("completion_tokens").fill_null(0)).sum())
    return (per.join(_wall(rows), on="run_id").with_columns(
        wall_h=pl.col("wall_s") / 3600, attempts_per_h=pl.col("attempts") / (pl.col("wall_s") / 3600),
        timed=pl.col("timed_s") / pl.col("wall_s"), busy=(pl.col("gpu_s") / pl.col("wall_s")).clip(upper_bound=1.0),
        tokens_per_s=pl.col("tokens") / pl.col("wall_s"))
        .select("run_id", "workers", "islands", "attempts", "wall_h", "attempts_per_h", "timed", "busy", "tokens_per_s")
        .with_columns(pl.col(pl.Float64).round(4)).sort("run_id"))


def per_worker(lin: Lineage) -> pl.DataFrame:
    """Per run, island and worker: attempts, commits, stale decisions, attempts per wall hour, mean times."""
    rows = _rows(lin).filter((pl.col("step") > 0) & ~pl.col("migrant"))
    evals = sum(pl.col(c).fill_null(0) for c in STAGE_COLUMNS)
    return (rows.group_by("run_id", "island", "worker").agg(
        attempts=pl.len(), commits=pl.col("committed").sum(), stale=(pl.col("decision") == "stale").sum(),
        failed=(pl.col("status") != "ok").sum(), propose_s=pl.col("propose_s").mean(), eval_s=evals.mean())
        .join(_wall(rows), on="run_id")
        .with_columns(attempts_per_h=pl.col("attempts") / (pl.col("wall_s") / 3600)).drop("wall_s")
        .with_columns(pl.col(pl.Float64).round(3)).sort("run_id", "island", "worker"))


def per_island(lin: Lineage) -> pl.DataFrame:
    """Per run and island: workers, attempts, commits, migrants received, supervisor interventions, and
    its best version now."""
    all_rows = _rows(lin)
    rows = all_rows.filter(pl.col("step") > 0)
    committed = all_rows.filter(pl.col("committed")).sort("version")
    # an island's lineage is v0 (every island's ancestor) and the versions committed into it: its best is the last
    best = committed.filter(pl.col("version") > 0).group_by("run_id", "island").agg(
        best_version=pl.col("version").last(), best_score=pl.col("score").last())
    seed = committed.filter(pl.col("version") == 0).select("run_id", v0="version", v0_score="score")
    tried = ~pl.col("migrant")
    sup = (lin.supervisor.group_by("run_id", pl.col("island").fill_null(0).cast(pl.Int32))
           .agg(interventions=pl.len()).collect())
    return (rows.group_by("run_id", "island").agg(
        workers=pl.col("worker").filter(tried).n_unique(), attempts=tried.sum(),
        commits=(pl.col("committed") & tried).sum(), migrants_in=pl.col("migrant").sum())
        .join(best, on=["run_id", "island"], how="left").join(seed, on="run_id", how="left")
        .join(sup, on=["run_id", "island"], how="left")
        .with_columns(pl.col("interventions").fill_null(0), best_version=pl.coalesce("best_version", "v0"),
                      best_score=pl.coalesce("best_score", "v0_score").round(2))
        .drop("v0", "v0_score").sort("run_id", "island"))


def commits_over_time(lin: Lineage) -> pl.DataFrame:
    """Every commit (migrants left out) with the minutes since its run began, and the worker and island that made it."""
    rows = _rows(lin)
    t0 = rows.group_by("run_id").agg(t0=pl.col("started_at").min())
    return (rows.filter(pl.col("committed") & ~pl.col("migrant")).join(t0, on="run_id")
            .with_columns(minutes=(pl.col("finished_at") - pl.col("t0")).dt.total_seconds(fractional=True) / 60)
            .select("run_id", "island", "worker", "version", "score", "minutes").sort("run_id", "minutes"))


def plot_commits(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Commits so far against minutes, one line per worker (and island)."""
    from avo.analysis.plots import _save, plt

    c = commits_over_time(lin).filter((pl.col("run_id") == run_id) & (pl.col("version") > 0))
    if c.is_empty():
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for (island, worker), d in c.group_by("island", "worker", maintain_order=True):
        ax.step(d["minutes"], range(1, len(d) + 1), where="post", label=f"island {island} worker {worker}")
    ax.set_xlabel("minutes since the run began")
    ax.set_ylabel("commits")
    ax.legend(fontsize=7)
    return _save(fig, path)
