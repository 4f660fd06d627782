"""Islands (search.islands = N > 1): N lineages in one run, the leading head migrating between them.

One lineage can corner itself: every candidate varies the same head. Islands keep N lines of descent
that explore apart and share their best now and then.

- The population is a query over the lineage: island i is v0 (the seed, evaluated once: every
  island's common ancestor) and the versions committed with island == i, in version order; its head
  (its best) is the last of them (avo.state). Versions are numbered across islands, so a number names
  one version; every row records its island.
- Worker w works on island w mod N (search.workers / N workers each). Steps come from the run's one
  counter, so candidate ids stay unique; a step cut short by a kill resumes on its own island.
- Every M-th step (search.migrate_every) is a migration step: no operator runs. The leading head (the
  highest chain ratio over v0: avo.history) is timed side by side with each other island's head, a
  paired round as for any candidate, and copied into each island whose head it beats by the `gain`
  rule (whatever search.commit.rule says: a swap that is no measured gain would only cost an island its
  own line): decision `migrated`, a new version of that island, parent_id the head it replaces,
  `extra.migrated_from` the version copied. Where it does not win, the row says `kept`. Either way
  the row carries the paired ratio, so every island's chain over v0 stays a chain of side-by-side
  measurements, and stored scores of different evaluations are compared nowhere.
- A migrant is its island's head: its next candidates are timed side by side with it, and a
  candidate in flight against the old head meets avo.workers' rule (re-timed or `stale`). It is the
  island's drift anchor for the `noninferior` rule too.
- With a harness that times nothing there is nothing to compare, and nothing migrates.
- A migration step can run twice: an island that already has a row at that step is skipped, so a run
  killed during one completes it when it resumes (the step last on record runs again if it migrates).
"""
from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from avo.types import Decision, Proposal


class Migration:
    """The operator column of a migration's rows: no operator proposed them."""
    name, model = "migration", ""


def island_of(worker: int, islands: int) -> int:
    return worker % islands


def migrates(step: int, s) -> bool:
    """Whether `step` is a migration step (s: the search config)."""
    return s.islands > 1 and s.migrate_every > 0 and step > 0 and step % s.migrate_every == 0


def migrate(search, step: int, worker: int) -> list[dict]:
    """Time the leading head side by side with each other island's head and copy it where it wins;
    returns the rows. The caller holds the lock under which decisions are made, so no head moves meanwhile."""
    st = search.state
    heads = [st.head(i) for i in range(search.s.islands)]
    timed = [v for v in heads if v is not None and v.chain_ratio is not None]
    if not search.harness.ranks or not timed:  # nothing timed, or no v0 yet (a transferred seed being adapted)
        return []
    lead = max(timed, key=lambda v: (v.chain_ratio, v.version))
    done = set(st.rows.filter(pl.col("step") == step)["island"].to_list())
    rows = []
    for island, head in enumerate(heads):
        if island in done or head.source == lead.source:
            continue
        started = datetime.now(timezone.utc)
        chain = st.chain(island)
        result = search.evaluate(lead.source, chain, head)
        won = search.verdict(result, chain, rule="gain") == Decision.COMMITTED
        proposal = Proposal(lead.source, message=f"migration: v{lead.version} of island {lead.island} "
                                                 f"{'replaces' if won else 'does not beat'} v{head.version}",
                            meta={"migrated_from": lead.candidate_id, "from_island": lead.island})
        rows.append(search.record(step, island, proposal, result, Decision.MIGRATED if won else Decision.KEPT, head,
                                  started, 0.0, Migration, worker, island))
    return rows
