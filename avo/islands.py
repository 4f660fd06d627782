"""Islands (search.islands = N > 1): N lineages in one run, the best version migrating between them.

One lineage can corner itself: every candidate varies the same best version. Islands keep N lines
of descent that explore apart and share their best now and then.

- The population is a query over the lineage: island i is v0 (the seed, evaluated once: every
  island's common ancestor) and the versions committed with island == i, in version order; its best
  is the last of them (Search.chain). Versions are numbered across islands, so a number names one
  version; every row records its island.
- Worker w works on island w mod N (search.workers / N workers each). Steps come from the run's one
  counter, so candidate ids stay unique; a step cut short by a kill resumes on its own island.
- Every M-th step (search.migrate_every) is a migration step: no operator runs; the best version of
  all islands (the highest score, the older among equals) is copied into each island whose best
  scores lower, as a row of its own: decision `migrated`, a new version committed into the receiving
  island, parent_id the version copied, attempt the receiving island, best_before that island's best.
- Scores measured in separate runs are compared only to choose what an island builds on; no commit
  rests on them. The receiving island's next candidates are timed side by side with the migrant (the
  harness's incumbent, as for any best), and a candidate in flight against the island's old best
  meets avo.workers' rule: re-timed against the migrant, or recorded `stale`. The migrant is also the
  island's drift anchor for the `noninferior` rule: neutral commits after it cannot drift below it.
- With a harness that times nothing there are no scores to compare, and nothing migrates.
- A migration step can run twice: an island that already has a row at that step is skipped, so a run
  killed during one completes it when it resumes (the step last on record runs again if it migrates).
"""
from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from avo import lineage
from avo.types import EvalResult, Proposal, Status


class Migration:
    """The operator column of a migrant: no operator proposed it."""
    name, model = "migration", ""


def island_of(worker: int, islands: int) -> int:
    return worker % islands


def migrates(step: int, s) -> bool:
    """Whether `step` is a migration step (s: the search config)."""
    return s.islands > 1 and s.migrate_every > 0 and step > 0 and step % s.migrate_every == 0


def migrate(search, step: int, worker: int) -> list[dict]:
    """Copy the best version of all islands into each island whose best scores lower; returns the rows.

    The caller holds the lock under which decisions are made, so no island's best moves meanwhile."""
    if not search.history:  # no v0 yet (a transferred seed still being adapted)
        return []
    bests = [search.chain(i)[-1] for i in range(search.s.islands)]
    scored = [v for v in bests if v.score is not None]
    if not scored:
        return []
    top = max(scored, key=lambda v: (v.score, -v.version))
    done = set(search.rows.filter(pl.col("step") == step)["island"].to_list())
    rows = []
    for island, best in enumerate(bests):
        if island in done or best.score is None or best.score >= top.score:
            continue
        started = datetime.now(timezone.utc)
        proposal = Proposal(top.source, message=f"migrant: v{top.version} of island {top.island} replaces "
                                                f"v{best.version} ({best.score:.1f})",
                            meta={"migrated_from": top.candidate_id, "from_island": top.island,
                                  "replaced": best.candidate_id})
        row = lineage.attempt_row(
            run_id=search.run_id, step=step, attempt=island, parent=top, version=search.history[-1].version + 1,
            decision=lineage.MIGRATED, result=EvalResult(Status.OK, ranked=True, score=top.score,
                                                         configs=list(top.configs)),
            proposal=proposal, operator=Migration, problem=search.problem, directive=search.directive(island),
            started=started, propose_s=0.0, source_sha=lineage.sha256(top.source), worker=worker, island=island)
        row["best_before"] = best.score  # the receiving island's best, as in every other row
        rows.append(search.keep(row))
        search.history.append(search._version(row))
    return rows
