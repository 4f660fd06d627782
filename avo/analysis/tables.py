"""Polars queries over a loaded lineage: attempts, commits, per-config results, run and sweep summaries.

Time is "active hours": the summed duration of the attempts so far, the clock the search budget
(search.max_hours) runs on, so a run that was stopped and resumed shows no idle gap.
"""
from __future__ import annotations

import polars as pl

from avo import lineage
from avo.analysis.reader import Lineage

FAILURES = ["compile_error", "incorrect", "crashed", "timeout", "invalid", "error"]
REJECTIONS = ["not_faster", "regression", "unranked"]
OUTCOMES = ["committed", *REJECTIONS, *FAILURES]
CONFIG_FIELDS = ["key", "tflops", "ms", "ms_p10", "ms_p90", "cudnn_tflops", "fa2_tflops", "max_err"]


# The columns tables.attempts keeps in memory; the rest (configs, message, error, extra, ...) stay on disk
# and are read for committed versions only, or by a query on lin.attempts.
# every scalar column of the lineage row (lineage.SCHEMA), and where the run lives; the wide ones
# (configs, message) are read only for committed versions
CORE = ["run_dir", *(f.name for f in lineage.SCHEMA if f.name not in lineage.WIDE_COLUMNS)]


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
    return (lin.cache.pop("core").lazy().sort("run_id", "step", "attempt")
            .with_columns(outcome=pl.when(pl.col("status") != "ok").then(pl.col("status"))
                          .otherwise(pl.col("decision")),
                          duration_s=duration.fill_null(0.0).clip(lower_bound=0.0),
                          tokens=pl.col("prompt_tokens").fill_null(0) + pl.col("completion_tokens").fill_null(0))
            .with_columns(hours=pl.col("duration_s").cum_sum().over("run_id") / 3600.0,
                          cum_tokens=pl.col("tokens").cum_sum().over("run_id"),
                          n=(pl.col("step") > 0).cast(pl.Int64).cum_sum().over("run_id"))
            .collect())


def commits(lin: Lineage) -> pl.LazyFrame:
    """Committed versions (x_0 the seed), with the attempts, hours and tokens spent to reach each."""
    return lin.cached("commits", lambda: _commits(lin)).lazy()


def _commits(lin: Lineage) -> pl.DataFrame:
    a = attempts(lin)
    c = a.filter(pl.col("committed")).join(lin.cache["wide"].lazy(), on=["run_id", "candidate_id"], how="left")
    # gain: against the parent (the previous version of its island; for a migrant, the version it copies)
    parent = c.select("run_id", parent_id="candidate_id", parent_score="score")
    return (c.join(parent, on=["run_id", "parent_id"], how="left").sort("run_id", "version")
            .with_columns(gain=pl.col("score") / pl.col("parent_score") - 1.0)
            .select("run_id", "version", "island", "decision", "step", "attempt", "candidate_id", "parent_id",
                    "score", "gain",
                    "paired_ratio", "paired_lo", "paired_hi", "incumbent_score",
                    "n", "hours", "cum_tokens", "message", "directive", "operator", "model", "source_sha",
                    "configs", "run_dir")
            .collect())


def configs(frame: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (candidate, benchmark config): the long table behind per-config plots."""
    return (frame.select("run_id", "version", "candidate_id", "configs").explode("configs")
            .filter(pl.col("configs").is_not_null()).unnest("configs")
            .with_columns(vs_cudnn=pl.col("tflops") / pl.col("cudnn_tflops"),
                          vs_fa2=pl.col("tflops") / pl.col("fa2_tflops")))


def best(lin: Lineage) -> pl.LazyFrame:
    """Each run's best committed version: highest score, the latest version among equals or unscored
    (migrants left out: each copies a version already there)."""
    return (commits(lin).filter(lineage.ORIGINAL)
            .sort(["run_id", "score", "version"], descending=[False, True, True], nulls_last=True)
            .group_by("run_id", maintain_order=True).first())


def best_configs(lin: Lineage) -> pl.LazyFrame:
    return configs(best(lin)).select("run_id", "version", *CONFIG_FIELDS, "vs_cudnn", "vs_fa2")


def _geomean(col: str) -> pl.Expr:
    x = pl.col(col)
    return pl.when((x > 0).all()).then(x.log().mean().exp()).otherwise(None)


def runs_summary(lin: Lineage) -> pl.DataFrame:
    """One row per run: effort, acceptance, failure taxonomy, best result and what it cost."""
    a = attempts(lin)
    tried = a.filter((pl.col("step") > 0) & lineage.ORIGINAL)  # attempts, not copies
    counts = tried.group_by("run_id").agg(
        steps=pl.col("step").max(), attempts=pl.len(), commits=pl.col("committed").sum(),
        **{o: (pl.col("outcome") == o).sum() for o in OUTCOMES if o != "committed"})
    totals = a.group_by("run_id").agg(hours=pl.col("duration_s").sum() / 3600.0, tokens=pl.col("tokens").sum(),
                                      llm_calls=pl.col("llm_calls").sum(), kernel_=pl.col("kernel").first(),
                                      group_=pl.col("group").first(), gpu=pl.col("gpu").drop_nulls().last())
    seed = (a.filter(pl.col("committed") & (pl.col("version") == 0))
            .group_by("run_id").agg(seed_score=pl.col("score").first()))
    b = best(lin)
    base = (configs(b).group_by("run_id")
            .agg(cudnn=_geomean("cudnn_tflops"), fa2=_geomean("fa2_tflops"),
                 worst_vs_cudnn=pl.col("vs_cudnn").min()))
    b = b.select("run_id", best_version="version", best_score="score", best_n="n", best_hours="hours",
                 best_tokens="cum_tokens")
    sup = lin.supervisor.group_by("run_id").agg(
        interventions=pl.len(), supervisor_tokens=(pl.col("prompt_tokens").fill_null(0)
                                                   + pl.col("completion_tokens").fill_null(0)).sum())
    out = (totals.join(counts, on="run_id", how="left").join(seed, on="run_id", how="left")
           .join(b, on="run_id", how="left").join(base, on="run_id", how="left")
           .join(sup, on="run_id", how="left")
           .with_columns(pl.col("steps", "attempts", "commits", "interventions", "supervisor_tokens",
                                *OUTCOMES[1:]).fill_null(0))
           .with_columns(acceptance=pl.when(pl.col("attempts") > 0).then(pl.col("commits") / pl.col("attempts")),
                         speedup=pl.col("best_score") / pl.col("seed_score"),
                         vs_cudnn=pl.col("best_score") / pl.col("cudnn"),
                         vs_fa2=pl.col("best_score") / pl.col("fa2"))
           .collect())
    runs = lin.runs.join(out, on="run_id", how="left").with_columns(
        kernel=pl.coalesce("kernel", "kernel_"), group=pl.coalesce("group", pl.col("group_").cast(pl.String)))
    return runs.drop("kernel_", "group_").sort("run_dir")


def sweep_summary(lin: Lineage, by: list[str] | None = None, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Runs grouped by override values (default: the keys that vary across the sweep)."""
    runs = runs_summary(lin) if runs is None else runs
    by = by or lin.sweep_keys or ["kernel", "group", "agent"]
    missing = [k for k in by if k not in runs.columns]
    if missing:
        raise KeyError(f"cannot group by {missing}: the runs have columns {runs.columns}")
    return (runs.group_by(by).agg(
        runs=pl.len(), attempts=pl.col("attempts").sum(), commits=pl.col("commits").sum(),
        **{o: pl.col(o).sum() for o in OUTCOMES[1:]},
        best_mean=pl.col("best_score").mean(), best_std=pl.col("best_score").std(),
        best_max=pl.col("best_score").max(), speedup_mean=pl.col("speedup").mean(),
        vs_cudnn_mean=pl.col("vs_cudnn").mean(), vs_fa2_mean=pl.col("vs_fa2").mean(),
        hours_mean=pl.col("hours").mean(), best_hours_median=pl.col("best_hours").median(),
        tokens_mean=pl.col("tokens").mean())
        .with_columns(acceptance=pl.when(pl.col("attempts") > 0).then(pl.col("commits") / pl.col("attempts")))
        .sort(by, nulls_last=True))
