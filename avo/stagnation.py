"""Stall detection over the lineage; the supervisor is called when this returns a reason."""
from __future__ import annotations

import polars as pl

from avo.schema import ORIGINAL


def detect(rows: pl.DataFrame, stag, since_step: int = 0) -> str | None:
    """Why the search looks stuck after the last intervention (at `since_step`), or None.

    stag: search.stagnation (no_commit_steps, consecutive_failures, repeated_source; 0 disables one).
    """
    recent = rows.filter((pl.col("step") > max(since_step, 0)) & (pl.col("step") > 0)
                         & ORIGINAL).sort("step", "attempt")  # a migrant is no progress
    if recent.is_empty():
        return None
    if stag.no_commit_steps:
        commits = recent.filter(pl.col("committed"))
        last_commit = int(commits["step"].max()) if len(commits) else max(since_step, 0)
        idle = int(recent["step"].max()) - last_commit
        if idle >= stag.no_commit_steps:
            return f"no commit in {idle} steps"
    if stag.consecutive_failures:
        tail = recent.reverse()["status"].to_list()
        n = next((i for i, s in enumerate(tail) if s == "ok"), len(tail))
        if n >= stag.consecutive_failures:
            return f"{n} failed attempts in a row (last: {recent['status'][-1]})"
    if stag.repeated_source:
        counts = recent.filter(pl.col("status") != "invalid").group_by("source_sha").len()
        worst = counts.sort("len").tail(1)
        if len(worst) and worst["len"][0] >= stag.repeated_source:
            return f"the same candidate proposed {worst['len'][0]} times"
    return None
