"""The one clock of a run: the wall time its attempts cover, the union of their spans.

With several workers attempts overlap, so their summed durations count the same second K times; a
stopped and resumed run has gaps no attempt covers. The union counts every second of work once and
no idle time: the search's budget (search.max_hours) and the analysis' hours are both this.
"""
from __future__ import annotations

import polars as pl


def _epoch(col: str) -> pl.Expr:
    return pl.col(col).dt.epoch("us").cast(pl.Float64) / 1e6


def covered(rows: pl.DataFrame, at: pl.Series | None = None) -> list[float]:
    """Seconds covered by the union of the rows' spans (started_at..finished_at) up to each time in `at`
    (datetimes; nulls stay null), or, without `at`, in all: one value."""
    spans = rows.select(s=_epoch("started_at"), e=_epoch("finished_at")).drop_nulls().sort("s")
    merged = (spans.with_columns(run=(pl.col("s") > pl.col("e").cum_max().shift(1)).fill_null(True).cum_sum())
              .group_by("run").agg(pl.col("s").min(), pl.col("e").max()).sort("s")
              .with_columns(before=(pl.col("e") - pl.col("s")).cum_sum().shift(1, fill_value=0.0)))
    if at is None:
        return [float((merged["e"] - merged["s"]).sum() or 0.0)]
    q = pl.DataFrame({"t": at}).select(_epoch("t"))
    if merged.is_empty():
        return q.select(pl.when(pl.col("t").is_not_null()).then(0.0).alias("x"))["x"].to_list()
    # the last merged span starting at or before each time, and how much of the union lies before it
    i = merged["s"].search_sorted(q["t"].fill_null(float("-inf")), side="right").cast(pl.Int64) - 1
    got = merged[i.clip(lower_bound=0)].with_columns(t=q["t"], i=i)
    return got.select(pl.when(pl.col("t").is_null()).then(None).when(pl.col("i") < 0).then(0.0).otherwise(
        pl.col("before") + pl.min_horizontal("e", "t") - pl.col("s")).alias("x"))["x"].to_list()


def busy_seconds(rows: pl.DataFrame) -> float:
    """The run's clock: wall time its attempts cover, each second once."""
    return covered(rows)[0]
