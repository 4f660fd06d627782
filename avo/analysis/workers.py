"""Runs with several workers (search.workers) or islands (search.islands): attempts per worker and per island,
the GPU's busy fraction, commits over time.

Wall time here is the union of the attempts' spans (what the search budget counts), not their sum,
over the search's steps: the seed's evaluation, which runs before any operator, is left out of the
rates (benchmarks/workers_throughput.py reports these same numbers).
The GPU's busy fraction is read from the recorded stage times: `timed` (screen and benchmark, which
hold the device lock alone) is exact to the lock; `busy` adds the correctness checks, which may
share the GPU with each other, so it can overstate a little when checks overlap. A migration's rows
(avo.islands) are counted apart: they are neither attempts nor commits.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from avo import history
from avo.analysis.reader import Lineage
from avo.clock import busy_seconds, covered
from avo.schema import ORIGINAL, STAGE_COLUMNS
from avo.types import Decision

COLUMNS = ("run_id", "step", "worker", "island", "committed", "decision", "status", "version", "score", "started_at",
           "finished_at", "propose_s", *STAGE_COLUMNS, "prompt_tokens", "completion_tokens", "candidate_id",
           "parent_id", "paired_ratio", "paired_lo", "paired_hi", "source_sha")


def _rows(lin: Lineage) -> pl.DataFrame:
    return lin.attempts.select(*COLUMNS).collect().with_columns(pl.col("worker", "island").fill_null(0),
                                                                migrant=~ORIGINAL)


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
    """Per run and island: workers, attempts, commits, migrants received, supervisor interventions, and its
    head (its best: the latest version committed on it) with its chain of paired ratios over v0."""
    all_rows = _rows(lin)
    rows = all_rows.filter(pl.col("step") > 0)
    c = history.chains(all_rows).select("run_id", "version", pl.col("island").fill_null(0).alias("of"), "score",
                                        x_v0="chain_ratio")
    # an island's lineage is v0 (every island's ancestor) and the versions committed into it: its head is the last
    heads = (rows.select("run_id", "island").unique().join(c, on="run_id")
             .filter((pl.col("of") == pl.col("island")) | (pl.col("version") == 0)).sort("version")
             .group_by("run_id", "island").agg(head_version=pl.col("version").last(), head_score=pl.col("score").last(),
                                               x_v0=pl.col("x_v0").last()))
    tried = ~pl.col("migrant")
    sup = (lin.supervisor.group_by("run_id", pl.col("island").fill_null(0).cast(pl.Int32))
           .agg(interventions=pl.len()).collect())
    return (rows.group_by("run_id", "island").agg(
        workers=pl.col("worker").filter(tried).n_unique(), attempts=tried.sum(),
        commits=(pl.col("committed") & tried).sum(), migrants_in=(pl.col("decision") == Decision.MIGRATED).sum())
        .join(heads, on=["run_id", "island"], how="left").join(sup, on=["run_id", "island"], how="left")
        .with_columns(pl.col("interventions").fill_null(0), pl.col("head_score", "x_v0").round(4))
        .sort("run_id", "island"))


def commits_over_time(lin: Lineage) -> pl.DataFrame:
    """Every commit (a migration's rows left out) with the run's clock at it (avo.clock: minutes of attempts),
    and the worker and island that made it."""
    out = []
    for _, d in _rows(lin).group_by("run_id", maintain_order=True):
        c = d.filter(pl.col("committed") & ~pl.col("migrant"))
        out.append(c.with_columns(minutes=pl.Series(covered(d, c["finished_at"]), dtype=pl.Float64) / 60))
    cols = ("run_id", "island", "worker", "version", "score", "minutes")
    return pl.concat(out).select(*cols).sort("run_id", "minutes") if out else pl.DataFrame(schema=dict.fromkeys(cols))


def plot_commits(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Commits so far against the run's clock, one line per worker (and island)."""
    from avo.analysis.plots import _save, plt

    c = commits_over_time(lin).filter((pl.col("run_id") == run_id) & (pl.col("version") > 0))
    if c.is_empty():
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for (island, worker), d in c.group_by("island", "worker", maintain_order=True):
        ax.step(d["minutes"], range(1, len(d) + 1), where="post", label=f"island {island} worker {worker}")
    ax.set_xlabel("minutes of attempts (the run's clock)")
    ax.set_ylabel("commits")
    ax.legend(fontsize=7)
    return _save(fig, path)
