"""What a lineage proved, and which version is the best: the one definition every part of AVO uses.

Scores are never compared across evaluations: two measured minutes apart differ by more than the gains the
search finds (clocks move). What the lineage proves is the chain of its commits: each was timed side by side
with its parent, the head before it, so each committed version carries a paired ratio over its parent
(`paired_ratio` with its one-sided bounds), and multiplying them along an island gives its speed relative to
v0 (`chain_ratio`; the distances to the bounds add in quadrature on the log scale, each factor an independent
measurement).

The best version of a lineage is its head: the latest version committed on it. With several islands (a
migration times the leading head side by side with each other island's head, and copies it where it wins),
the run's best is the head with the highest chain ratio (a migrant head: the version it copies): each
island's chain is its own side-by-side evidence against the same v0, but heads of different islands were
not timed side by side with each other since the last migration, and the outputs say so.
"""
from __future__ import annotations

import math

import polars as pl

from avo.types import Decision

CHAIN = ("chain_ratio", "chain_lo", "chain_hi")
NOT_SIDE_BY_SIDE = ("the heads of {n} islands were not timed side by side with each other: the best is the one "
                    "whose chain of paired ratios over v0 is highest (time them together with avo.bench to compare)")


def link(parent: tuple | None, row: dict) -> tuple | None:
    """(ratio, lo, hi) over v0 of a committed row, from its parent's: the seed is 1; a commit multiplies
    its parent's by its paired ratio, the distances to each bound adding in quadrature on the log scale; a
    migrant recorded before migrations were timed (schema 5) is a copy of its parent. None where a factor
    was not timed (harness=compile)."""
    if row["decision"] == Decision.SEED.value:
        return 1.0, 1.0, 1.0
    if parent is None:
        return None
    r, lo, hi = row["paired_ratio"], row["paired_lo"], row["paired_hi"]
    if r is None:
        return parent if row["decision"] == Decision.MIGRATED.value else None
    (pdown, pup), (down, up) = _widths(parent), _widths((r, lo, hi))
    log = math.log(parent[0]) + math.log(r)
    return math.exp(log), math.exp(log - math.hypot(pdown, down)), math.exp(log + math.hypot(pup, up))


def _widths(c: tuple) -> tuple[float, float]:
    """How far below and above the ratio its bounds lie, on the log scale (inf: unbounded)."""
    r, lo, hi = c
    down = math.log(r) - math.log(lo) if lo is not None and lo > 0 else math.inf
    up = math.log(hi) - math.log(r) if hi is not None and math.isfinite(hi) else math.inf
    return down, up


def chains(rows: pl.DataFrame) -> pl.DataFrame:
    """The committed rows of one or more runs (any rows may be passed) in version order, with their chain over
    v0 (CHAIN), `head` (the latest version of an island, v0 for an island without commits) and `best` (one
    per run: see the module docstring), and `islands` (how many lineages the run has)."""
    islands = rows.group_by("run_id").agg(islands=pl.col("island").fill_null(0).max() + 1)
    c = rows.filter(pl.col("committed")).sort("run_id", "version").join(islands, on="run_id", how="left")
    out = []
    for (_run,), d in c.group_by("run_id", maintain_order=True):
        found: dict[str, tuple | None] = {}
        chain = []
        for r in d.iter_rows(named=True):
            found[r["candidate_id"]] = link(found.get(r["parent_id"]), r)
            chain.append(found[r["candidate_id"]])
        n = d["islands"][0]
        island = d["island"].fill_null(0)
        heads = {int(d["version"].filter((island == i) | (d["version"] == 0)).max()) for i in range(n)}
        # a migrant head and the head it copies are one kernel: the original stands for both
        sha = {v: d["source_sha"][_at(d, v)] for v in heads}
        distinct = {min(h for h in heads if sha[h] == sha[v]) for v in heads}
        best = max(distinct, key=lambda v: _rank(chain[_at(d, v)], v))
        out.append(d.with_columns(*(pl.Series(name, [x and x[k] for x in chain], pl.Float64)
                                    for k, name in enumerate(CHAIN)),
                                  head=d["version"].is_in(list(heads)), best=d["version"] == best))
    if not out:
        return c.with_columns(*(pl.lit(None, pl.Float64).alias(n) for n in CHAIN), head=pl.lit(False),
                              best=pl.lit(False))
    return pl.concat(out)


def _at(d: pl.DataFrame, version: int) -> int:
    return d["version"].to_list().index(version)


def _rank(chain: tuple | None, version: int) -> tuple:
    """Heads compare by chain ratio over v0 (untimed ones last), then the latest first."""
    return (chain is not None, chain[0] if chain else 0.0, version)


def best(rows: pl.DataFrame) -> pl.DataFrame:
    """Each run's best committed version (a row of `chains`)."""
    return chains(rows).filter(pl.col("best"))
