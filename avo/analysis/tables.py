"""Polars queries over a loaded lineage: attempts, commits, per-config results, run and sweep summaries.

Time is "active hours" (avo.clock): the wall time the attempts cover, each second once however many workers
overlap, the clock the search budget (search.max_hours) runs on, so a run that was stopped and resumed shows
no idle gap. What a run achieved is what its lineage proved (avo.history): each commit's paired ratio over
its parent and their chain over v0 (`x_v0`); `score` is each version's own evaluation, comparable only with
what was timed in that evaluation (cuDNN and FA2 there), never with another version's score.
"""
from __future__ import annotations

import polars as pl

from avo import history
from avo.analysis.reader import Lineage
from avo.clock import covered
from avo.schema import ORIGINAL, OUTCOME, SCHEMA, WIDE_COLUMNS
from avo.types import OUTCOMES, Status

FAILURES = [s.value for s in Status if s is not Status.OK]  # outcomes of an evaluation that did not pass
CONFIG_FIELDS = ["key", "tflops", "ms", "ms_p10", "ms_p90", "cudnn_tflops", "fa2_tflops", "max_err"]
X_V0 = {"chain_ratio": "x_v0", "chain_lo": "x_v0_lo", "chain_hi": "x_v0_hi"}  # the chain, as tables name it

# every scalar column of the lineage row (avo.schema), and where the run lives; the wide ones
# (configs, message, ...) are read for committed versions only, or by a query on lin.attempts
CORE = ["run_dir", *(f.name for f in SCHEMA if f.name not in WIDE_COLUMNS)]


def attempts(lin: Lineage) -> pl.LazyFrame:
    """Every attempt in (run, step, attempt) order with outcome, duration, hours and tokens so far.

    outcome: the status when evaluation failed, else the decision (seed, committed, not_faster, ...).
    n: the attempt's number within its run (the seed is 0). Read once per load and kept in memory (the CORE
    columns; join lin.attempts on run_id, candidate_id for the others).
    """
    return lin.cached("attempts", lambda: _attempts(lin)).lazy()


def _read(lin: Lineage) -> None:
    """One pass over the files: CORE columns of every attempt, message and configs of committed ones only."""
    try:
        df = lin.attempts.select(*CORE, "message", "configs").collect()
    except pl.exceptions.ComputeError as e:
        lin.salvage(e)
        df = lin.attempts.select(*CORE, "message", "configs").collect()
    lin.cache["wide"] = df.filter(pl.col("committed")).select("run_id", "candidate_id", "message", "configs")
    lin.cache["core"] = df.drop("message", "configs")


def _attempts(lin: Lineage) -> pl.DataFrame:
    duration = (pl.col("finished_at") - pl.col("started_at")).dt.total_seconds(fractional=True)
    if "core" not in lin.cache:
        _read(lin)
    df = (lin.cache.pop("core").lazy()
          .with_columns(outcome=OUTCOME, duration_s=duration.fill_null(0.0).clip(lower_bound=0.0),
                        tokens=pl.col("prompt_tokens").fill_null(0) + pl.col("completion_tokens").fill_null(0))
          .sort("run_id", "finished_at", "step", "attempt")  # what was spent before each: in the order it was
          .with_columns(cum_tokens=pl.col("tokens").cum_sum().over("run_id"),
                        n=((pl.col("step") > 0) & ORIGINAL).cast(pl.Int64).cum_sum().over("run_id"))
          .collect())
    return pl.concat([d.with_columns(hours=pl.Series(covered(d, d["finished_at"]), dtype=pl.Float64) / 3600.0)
                      for _, d in df.group_by("run_id", maintain_order=True)] or [df.with_columns(hours=pl.lit(0.0))]
                     ).sort("run_id", "step", "attempt")


def commits(lin: Lineage) -> pl.LazyFrame:
    """Committed versions (x_0 the seed) with what the lineage proved about each (x_parent: its paired ratio
    over its parent; x_v0: their chain, avo.history), whether it is its island's head or the run's best, and
    the attempts, hours and tokens spent to reach it."""
    return lin.cached("commits", lambda: _commits(lin)).lazy()


def _commits(lin: Lineage) -> pl.DataFrame:
    a = attempts(lin).collect()
    c = history.chains(a).join(lin.cache["wide"], on=["run_id", "candidate_id"], how="left")
    return (c.rename(X_V0).sort("run_id", "version")
            .select("run_id", "version", "island", "decision", "step", "attempt", "candidate_id", "parent_id",
                    "score", pl.col("paired_ratio").alias("x_parent"), pl.col("paired_lo").alias("x_parent_lo"),
                    pl.col("paired_hi").alias("x_parent_hi"), *X_V0.values(), "incumbent_score", "head", "best",
                    "islands", "n", "hours", "finished_at", "cum_tokens", "message", "directive", "operator", "model",
                    "source_sha", "configs", "run_dir"))


def configs(frame: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (candidate, benchmark config): the long table behind per-config plots."""
    return (frame.select("run_id", "version", "candidate_id", "configs").explode("configs")
            .filter(pl.col("configs").is_not_null()).unnest("configs")
            .with_columns(vs_cudnn=pl.col("tflops") / pl.col("cudnn_tflops"),
                          vs_fa2=pl.col("tflops") / pl.col("fa2_tflops")))


def best(lin: Lineage) -> pl.LazyFrame:
    """Each run's best committed version (avo.history: its head; with islands, the highest chain over v0)."""
    return commits(lin).filter(pl.col("best"))


def best_configs(lin: Lineage) -> pl.LazyFrame:
    return configs(best(lin)).select("run_id", "version", *CONFIG_FIELDS, "vs_cudnn", "vs_fa2")


def _geomean(col: str) -> pl.Expr:
    x = pl.col(col)
    return pl.when((x > 0).all()).then(x.log().mean().exp()).otherwise(None)


def runs_summary(lin: Lineage) -> pl.DataFrame:
    """One row per run: effort, acceptance, one column per outcome (they add up to `attempts`), the best
    version and what the lineage proved about it, and what it cost."""
    a = attempts(lin)
    tried = a.filter((pl.col("step") > 0) & ORIGINAL)  # attempts: not the seed, not a migration's rows
    counts = tried.group_by("run_id").agg(
        steps=pl.col("step").max(), attempts=pl.len(), **{o: (pl.col("outcome") == o).sum() for o in OUTCOMES})
    totals = a.group_by("run_id").agg(hours=pl.col("hours").max(), tokens=pl.col("tokens").sum(),
                                      llm_calls=pl.col("llm_calls").sum(), kernel_=pl.col("kernel").first(),
                                      group_=pl.col("group").first(), gpu=pl.col("gpu").drop_nulls().last())
    seed = (a.filter(pl.col("committed") & (pl.col("version") == 0))
            .group_by("run_id").agg(seed_score=pl.col("score").first()))
    b = best(lin)
    base = (configs(b).group_by("run_id")
            .agg(cudnn=_geomean("cudnn_tflops"), fa2=_geomean("fa2_tflops"),
                 worst_vs_cudnn=pl.col("vs_cudnn").min()))
    b = b.select("run_id", "islands", *X_V0.values(), best_version="version", best_score="score", best_n="n",
                 best_hours="hours", best_tokens="cum_tokens").join(
        commits(lin).filter(pl.col("head")).group_by("run_id").agg(heads=pl.col("version").n_unique()), on="run_id")
    sup = lin.supervisor.group_by("run_id").agg(
        interventions=pl.len(), supervisor_tokens=(pl.col("prompt_tokens").fill_null(0)
                                                   + pl.col("completion_tokens").fill_null(0)).sum())
    out = (totals.join(counts, on="run_id", how="left").join(seed, on="run_id", how="left")
           .join(b, on="run_id", how="left").join(base, on="run_id", how="left")
           .join(sup, on="run_id", how="left")
           .with_columns(pl.col("steps", "attempts", "interventions", "supervisor_tokens", *OUTCOMES).fill_null(0))
           .with_columns(commits=pl.col("committed"),
                         acceptance=pl.when(pl.col("attempts") > 0).then(pl.col("committed") / pl.col("attempts")),
                         # cuDNN and FA2 were timed in the best version's own evaluation: side by side with it
                         vs_cudnn=pl.col("best_score") / pl.col("cudnn"), vs_fa2=pl.col("best_score") / pl.col("fa2"))
           .collect())
    runs = lin.runs.join(out, on="run_id", how="left").with_columns(
        kernel=pl.coalesce("kernel", "kernel_"), group=pl.coalesce("group", pl.col("group_").cast(pl.String)))
    return runs.drop("kernel_", "group_").sort("run_dir")


ACROSS_RUNS = ("best_score of different runs comes from different evaluations (other clocks, maybe other GPUs): "
               "compare runs by x_v0 (each against its own v0), or time their best versions together with avo.bench")


def sweep_summary(lin: Lineage, by: list[str] | None = None, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Runs grouped by override values (default: the keys that vary across the sweep). See ACROSS_RUNS."""
    runs = runs_summary(lin) if runs is None else runs
    by = by or lin.sweep_keys or ["kernel", "group", "agent"]
    missing = [k for k in by if k not in runs.columns]
    if missing:
        raise KeyError(f"cannot group by {missing}: the runs have columns {runs.columns}")
    return (runs.group_by(by).agg(
        runs=pl.len(), attempts=pl.col("attempts").sum(), commits=pl.col("commits").sum(),
        **{o: pl.col(o).sum() for o in OUTCOMES},
        x_v0_mean=pl.col("x_v0").mean(), x_v0_std=pl.col("x_v0").std(), x_v0_max=pl.col("x_v0").max(),
        best_mean=pl.col("best_score").mean(), best_max=pl.col("best_score").max(),
        vs_cudnn_mean=pl.col("vs_cudnn").mean(), vs_fa2_mean=pl.col("vs_fa2").mean(),
        hours_mean=pl.col("hours").mean(), best_hours_median=pl.col("best_hours").median(),
        tokens_mean=pl.col("tokens").mean())
        .with_columns(acceptance=pl.when(pl.col("attempts") > 0).then(pl.col("commits") / pl.col("attempts")))
        .sort(by, nulls_last=True))
