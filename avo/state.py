"""The lineage as a running search holds it: the rows on record, the committed versions, the supervisor's
interventions, and the clock. Everything here is read back from the run directory when it opens, so a
restarted search continues where the last row that reached disk left off.

The search core (avo.workers) and migrations (avo.islands) change it only through `record`, `commit` and
`intervene`, under the core's lock; what operators see of it is the StepContext the core builds from it.
"""
from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from avo import history, lineage, transfer
from avo.clock import busy_seconds
from avo.schema import ORIGINAL, STAGE_COLUMNS, SUPERVISOR_SCHEMA, extended
from avo.types import Attempt, ConfigResult, Decision, Status, Version

RECENT = 20  # attempts of its island an operator is shown (the supervisor's trajectory, the verdict)


class LineageState:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.rows = lineage.read_run(run_dir)
        self.versions: list[Version] = []  # every committed version in version order, all islands
        for r in history.chains(self.rows).iter_rows(named=True):
            self.versions.append(self._version(r, (r["chain_ratio"], r["chain_lo"], r["chain_hi"])))
        # an interrupted attempt was never judged: its source may be proposed again
        self.tried = set(self.rows.filter(pl.col("decision") != Decision.INTERRUPTED.value)["source_sha"].to_list())
        self.sup = lineage.scan_supervisor([run_dir]).collect()
        # a transferred seed that failed here: the operator adapts it until a candidate passes (-> v0)
        pending = transfer.failed_seed(self.rows)
        self.pending: Version | None = self._version(pending, None) if pending and not self.versions else None
        self.spent = busy_seconds(self.rows)  # the clock so far (avo.clock); this session's runs on from t0
        self.t0 = time.monotonic()

    @property
    def islands(self) -> int:
        """How many islands the rows on record use."""
        return int(self.rows["island"].fill_null(0).max() or 0) + 1

    # -- reading ---------------------------------------------------------------------------------
    def chain(self, island: int = 0) -> list[Version]:
        """One island's lineage, oldest first: v0 (every island's ancestor) and the versions committed into it."""
        return [v for v in self.versions if v.island == island or v.version == 0]

    def head(self, island: int = 0) -> Version | None:
        """The island's best version: the latest committed on it (None before v0)."""
        chain = self.chain(island)
        return chain[-1] if chain else None

    def start(self, island: int = 0) -> Version | None:
        """What the island's next candidate varies: its head, or a transferred seed still being adapted."""
        return self.head(island) or self.pending

    def best(self) -> Version | None:
        """The run's best version (avo.history: the head; with several islands, the highest chain)."""
        b = history.best(self.rows)
        return next(v for v in self.versions if v.version == b["version"][0]) if len(b) else None

    def attempts(self, where: pl.Expr, last: int | None = None) -> list[Attempt]:
        rows = self.rows.filter(where).sort("step", "attempt")
        return [Attempt(r["candidate_id"], lineage.read_source(self.run_dir, r["source_sha"]), Status(r["status"]),
                        r["decision"], r["score"], r["error"] or "", r["message"] or "", r["version"])
                for r in (rows.tail(last) if last else rows).iter_rows(named=True)]

    def failures(self, step: int) -> list[Attempt]:
        """A step's earlier attempts (and the failed transferred seed, until v0 exists)."""
        seen = pl.col("step") == step
        if not self.versions and self.pending is not None:
            seen = seen | (pl.col("candidate_id") == self.pending.candidate_id)
        return self.attempts(seen)

    def recent(self, island: int) -> list[Attempt]:
        return self.attempts(self.own(island) & (pl.col("step") > 0), RECENT)

    def own(self, island: int) -> pl.Expr:
        return pl.col("island").fill_null(0) == island

    def directive(self, island: int = 0) -> str | None:
        """The supervisor's latest directions for an island's operators (None before any)."""
        mine = self.sup.filter(self.own(island)).sort("at")
        return mine["directive"][-1] if len(mine) else None

    def directions(self, island: int) -> list[str]:
        """Every directive the island was given, oldest first."""
        return [d for d in self.sup.filter(self.own(island)).sort("at")["directive"].to_list() if d]

    def elapsed(self) -> float:
        """Seconds on the run's clock (the union of the attempts' spans, this session's wall time added)."""
        return self.spent + time.monotonic() - self.t0

    def expected_eval_s(self) -> float:
        """What a normal evaluation costs here: the latest head's own, all stages."""
        r = self.rows.filter(pl.col("committed") & ORIGINAL).tail(1)
        return float(sum(r[c].fill_null(0.0).item() for c in STAGE_COLUMNS)) if len(r) else 0.0

    def next_version(self) -> int:
        return self.versions[-1].version + 1 if self.versions else 0

    # -- writing ---------------------------------------------------------------------------------
    def record(self, row: dict) -> dict:
        """Write a row that adds no version (a rejected, failed or invalid attempt, a kept head) and keep it."""
        if row["committed"]:
            raise ValueError(f"{row['candidate_id']} ({row['decision']}) adds a version: commit it")
        return self._write(row)

    def commit(self, row: dict) -> Version:
        """Write a committed row; returns the new version, now its island's head, with its chain over v0."""
        if not row["committed"]:
            raise ValueError(f"{row['candidate_id']} ({row['decision']}) is no commit: record it")
        parent = next((v for v in self.versions if v.candidate_id == row["parent_id"]), None)
        chain = (parent.chain_ratio, parent.chain_lo, parent.chain_hi) if parent and parent.chain_ratio is not None \
            else None
        self._write(row)
        self.versions.append(self._version(row, history.link(chain, row)))
        return self.versions[-1]

    def _write(self, row: dict) -> dict:
        lineage.append(self.run_dir, row)
        self.rows = extended(self.rows, [row])
        if row["decision"] != Decision.INTERRUPTED.value:
            self.tried.add(row["source_sha"])
        return row

    def adapt(self, row: dict) -> None:
        """Keep a transferred seed that failed here (its step-0 row) in view until a candidate becomes v0."""
        self.pending = self._version(row, None)

    def intervene(self, record: dict) -> dict:
        """Write a supervisor intervention and keep it in memory."""
        record = lineage.append_supervisor(self.run_dir, record)
        self.sup = extended(self.sup, [record], SUPERVISOR_SCHEMA)
        return record

    def _version(self, r: dict, chain: tuple | None) -> Version:
        stage_s = {k: v for k, v in {"verify": r["verify_s"], "screen": r["screen_s"], "bench": r["bench_s"]}.items()
                   if v}
        if r["decision"] == Decision.MIGRATED and not stage_s:  # a schema-5 copy: the stage times of the original
            stage_s = next((o.stage_s for o in self.versions if o.candidate_id == r["parent_id"]), stage_s)
        # a migrant is its island's new anchor (significantly faster than the head it replaced), as the seed
        # is every island's first
        gain = r["decision"] in (Decision.SEED, Decision.MIGRATED) or (r["paired_lo"] or 0) > 1.0
        c = chain or (None, None, None)
        return Version(r["version"], r["candidate_id"], lineage.read_source(self.run_dir, r["source_sha"]),
                       r["score"], [ConfigResult(**x) for x in r["configs"] or []], r["message"] or "",
                       stage_s, gain, r["island"] or 0,
                       r["paired_ratio"], r["paired_lo"], r["paired_hi"], *c)
