"""What an evaluation costs, stage by stage: medians per run and outcome.

`eval_s` is an attempt's wall time less its proposal: what the search waited for the harness
(writing the job, handing it to a ready worker, every stage, reading the result back), all of it
on the GPU machine. The stage columns are the worker's own clocks; `other_s` is the rest
(hand-over, the device lock's waits with several workers, result and lineage writes).
Outcomes: `screened` (dropped by the paired screen), `full` (the whole paired benchmark),
otherwise the failure's status. Migrants (search.islands) are copies, not evaluations.
"""
from __future__ import annotations

import polars as pl

from avo.analysis.reader import Lineage
from avo.schema import ORIGINAL, STAGE_COLUMNS


def by_stage(lin: Lineage) -> pl.DataFrame:
    """Per run and outcome: attempts and the median seconds of each stage and of the whole evaluation."""
    rows = lin.attempts.filter((pl.col("step") > 0) & ORIGINAL).select(
        "run_id", "stage", "status", "propose_s", *STAGE_COLUMNS,
        ((pl.col("finished_at") - pl.col("started_at")).dt.total_seconds(fractional=True)
         - pl.col("propose_s").fill_null(0)).alias("eval_s")).collect()
    stages = [pl.col(c).fill_null(0) for c in STAGE_COLUMNS]
    return (rows.with_columns(
        outcome=pl.when(pl.col("stage") == "screen").then(pl.lit("screened"))
        .when(pl.col("stage") == "bench").then(pl.lit("full")).otherwise(pl.col("status")),
        other_s=pl.col("eval_s") - sum(stages))
        .group_by("run_id", "outcome").agg(pl.len().alias("n"), *[s.median() for s in stages],
                                           pl.col("other_s").median(), pl.col("eval_s").median())
        .with_columns(pl.col(pl.Float64).round(2)).sort("run_id", "n", descending=[False, True]))
