"""The single-lineage search: x0 -> x1 -> ... , a version committed only when correct and at least as fast.

Everything the loop knows is read back from the lineage, so a restarted run continues
where the last attempt that reached disk left off. With search.islands > 1 the run keeps
several such lineages (avo.islands), each a query over the same rows.
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import polars as pl
from omegaconf import DictConfig, OmegaConf

from avo import interrupt, lineage, transfer
from avo.commit import anchor, decide
from avo.errors import SearchError
from avo.harness import HarnessBench, make_harness
from avo.operators import make_operators
from avo.paired import annotate
from avo.problem import problem_from_cfg
from avo.progress import Progress
from avo.seeds import Seed, resolve
from avo.stagnation import detect
from avo.types import (
    Attempt,
    ConfigResult,
    EvalResult,
    Problem,
    Proposal,
    ProposalError,
    Redirect,
    Status,
    StepContext,
    Version,
)
from avo.workers import Workers

SEED_OPERATOR = SimpleNamespace(name="seed", model="")  # what the seed's rows name: no operator proposed it


@dataclass
class Summary:
    run_dir: str
    run_id: str
    steps: int
    attempts: int
    commits: int
    best_version: int | None
    best_score: float | None
    stopped: str
    elapsed_s: float


def run_search(cfg: DictConfig) -> Summary:
    run_dir = Path(cfg.resume or cfg.run_dir).expanduser().resolve()
    problem = problem_from_cfg(cfg.kernel)
    info = _open_run(cfg, run_dir, problem)
    harness = make_harness(cfg.harness, run_dir / "work", commit=cfg.search.commit)
    try:
        operators = make_operators(cfg.agent, run_dir, problem, int(cfg.search.get("workers", 1)))
    except BaseException:
        harness.close()
        raise
    try:
        return Search(cfg, run_dir, info["run_id"], problem, harness, operators[0], operators[1:]).run()
    finally:
        for op in operators:
            op.close()
        harness.close()
        lineage.compact(run_dir, full=True)


def _open_run(cfg: DictConfig, run_dir: Path, problem: Problem) -> dict:
    info = lineage.read_run_info(run_dir)
    identity = {"kernel": problem.name, "heads_q": problem.heads_q, "heads_kv": problem.heads_kv,
                "head_dim": problem.head_dim}
    if info is None:
        if cfg.resume:
            raise SearchError(f"resume={cfg.resume}: no run.json there, so nothing to resume")
        info = {"run_id": f"{run_dir.name}-{uuid.uuid4().hex[:6]}", **identity, "group": problem.group,
                "agent": cfg.agent.name, "operator": cfg.agent.kind, "model": cfg.agent.get("model", ""),
                "seed": str(cfg.seed), "harness": cfg.harness.name, "overrides": _overrides(),
                "started_at": datetime.now(timezone.utc).isoformat(),
                "config": OmegaConf.to_container(cfg, resolve=True)}
        lineage.write_run_info(run_dir, info)
        return info
    clash = {k: (info.get(k), v) for k, v in identity.items() if info.get(k) != v}
    if clash:
        raise SearchError(f"{run_dir} holds a different problem ({clash}); start a new run directory instead")
    return info


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


class Search:
    def __init__(self, cfg, run_dir: Path, run_id: str, problem: Problem, harness, operator, crew=()):
        self.cfg, self.s = cfg, cfg.search
        self.run_dir, self.run_id, self.problem = run_dir, run_id, problem
        self.harness, self.operator = harness, operator
        self.crew = list(crew)  # further operators working at once (search.workers > 1; avo.workers)
        self.rows = lineage.read_run(run_dir)
        on_record = int(self.rows["island"].fill_null(0).max() or 0) + 1
        if on_record > self.s.islands:
            raise SearchError(f"{run_dir} holds {on_record} islands; resume it with search.islands={on_record} "
                              f"(not {self.s.islands}), or start a new run directory")
        self.history: list[Version] = []  # every committed version in version order, all islands
        for r in self.rows.filter(pl.col("committed")).sort("version").iter_rows(named=True):
            self.history.append(self._version(r))
        # an interrupted attempt was never judged: its source may be proposed again
        self.tried = set(self.rows.filter(pl.col("decision") != interrupt.INTERRUPTED)["source_sha"].to_list())
        self.rng = random.Random(f"{cfg.rng}:{len(self.rows)}")
        self.spent = float(self.rows.select((pl.col("finished_at") - pl.col("started_at")).dt.total_seconds(
            fractional=True).sum()).item() or 0.0)
        self.t0 = time.monotonic()
        self.progress = Progress(run_id, harness.ranks)
        self.sup = lineage.scan_supervisor([run_dir]).collect()  # read once; _supervise appends
        self.directives = self._last_directives()  # island -> the supervisor's latest directions for it
        # a transferred seed that failed here: the operator adapts it until a candidate passes (-> v0)
        pending = transfer.failed_seed(self.rows)
        self.pending: Version | None = self._version(pending) if pending and not self.history else None

    # -- state read back from the lineage ------------------------------------------------------
    def _version(self, r: dict) -> Version:
        stage_s = {"verify": r["verify_s"], "screen": r.get("screen_s"), "bench": r["bench_s"]}
        # a migrant is its island's new anchor, as the seed is every island's first
        gain = r["decision"] in ("seed", lineage.MIGRATED) or (r.get("paired_lo") is not None and r["paired_lo"] > 1.0)
        v = Version(r["version"], r["candidate_id"], lineage.read_source(self.run_dir, r["source_sha"]),
                    r["score"], [ConfigResult(**c) for c in r["configs"] or []], r["message"] or "",
                    {k: v for k, v in stage_s.items() if v}, gain, r["island"] or 0)
        if r["decision"] == lineage.MIGRATED:  # timed in the island it came from: the stage times of the original
            v.stage_s = next((o.stage_s for o in self.history if o.candidate_id == r["parent_id"]), v.stage_s)
        return v

    def chain(self, island: int = 0) -> list[Version]:
        """One island's lineage, oldest first: v0 (every island's ancestor) and the versions committed into it."""
        return [v for v in self.history if v.island == island or v.version == 0]

    def _last_directives(self) -> dict[int, str | None]:
        latest = self.sup.sort("at").group_by(pl.col("island").fill_null(0), maintain_order=True).last()
        return dict(zip(latest["island"].to_list(), latest["directive"].to_list(), strict=True))

    def directive(self, island: int = 0) -> str | None:
        """The supervisor's latest directions for an island's operators (None before any)."""
        return self.directives.get(island)

    def _next_position(self) -> tuple[int, int]:
        last = self.rows.sort("step", "attempt").tail(1).row(0, named=True)
        if last["committed"] or last["attempt"] + 1 >= self.s.attempts_per_step or last["step"] == 0:
            return last["step"] + 1, 0
        return last["step"], last["attempt"] + 1

    def _bench(self, best: Version | None) -> HarnessBench:
        """What the operator may do with the harness in a step: bound to the problem and the incumbent."""
        inc = best.reference("incumbent") if best is not None and self.history else None
        return HarnessBench(self.harness, self.problem, inc, self.deadline(), self.s.commit.alpha)

    def elapsed(self) -> float:
        return self.spent + time.monotonic() - self.t0

    def deadline(self) -> float:
        """time.monotonic() at which search.max_hours runs out."""
        return time.monotonic() + self.s.max_hours * 3600 - self.elapsed()

    def expected_eval_s(self) -> float:
        """What a normal evaluation costs here: the incumbent's own, all stages."""
        r = self.rows.filter(pl.col("committed") & lineage.ORIGINAL).tail(1)
        if r.is_empty():
            return 0.0
        return float(sum(r[c].fill_null(0.0).item() for c in lineage.STAGE_COLUMNS))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Summary:
        if not self.history and self.pending is None:
            self._seed()
        elif self.history:
            self.progress.resumed(self.rows, self.history[-1])
        stopped = Workers(self, [self.operator, *self.crew]).run() if self.crew else self._loop()
        return self._summary(stopped)

    def _seed(self) -> None:
        seed: Seed = resolve(self.cfg.seed)
        seed.check(self.problem.head_dim, self.harness.arch)
        attempt = 0 if self.rows.is_empty() else int(self.rows["attempt"].max()) + 1
        self.progress.line(f"evaluating the seed {seed.origin} on {self.problem.name} "
                           f"(Hq={self.problem.heads_q}, Hkv={self.problem.heads_kv}, d={self.problem.head_dim})")
        if seed.run_dir is not None:
            from avo.transfer import carry_knowledge

            carry_knowledge(seed.run_dir, self.run_dir)
        started = datetime.now(timezone.utc)
        result = self.harness.evaluate(seed.source, self.problem)
        ok = result.ok
        row = self._record(0, attempt, Proposal(seed.source, message=f"seed {seed.origin}",
                                                meta=transfer.seed_meta(seed.run_dir, seed.version)), result,
                           "seed" if ok else "failed", None, started, 0.0)
        if not ok and seed.run_dir is not None:
            self.pending = self._version(row)
            self.progress.line(f"the transferred seed {seed.origin} fails on {self.problem.name} "
                               f"({result.status.value}); adapting it comes first: the first correct "
                               "candidate becomes v0")
            return
        if not ok:
            raise SearchError(f"the seed {seed.origin} does not pass harness={self.harness.name} "
                              f"({result.status.value}): {result.error.splitlines()[0] if result.error else ''}")
        self.history.append(self._version(row))

    def _loop(self) -> str:
        while True:
            step, attempt = self._next_position()
            if step > self.s.max_steps:
                return f"reached search.max_steps={self.s.max_steps}"
            if self.elapsed() >= self.s.max_hours * 3600:
                return f"reached search.max_hours={self.s.max_hours}"
            need = self.expected_eval_s()
            if self.elapsed() + need >= self.s.max_hours * 3600:
                return (f"reached search.max_hours={self.s.max_hours}: no time left for another evaluation "
                        f"(about {need:.0f} s)")
            row = self._attempt(step, attempt)
            if row["committed"] or attempt + 1 >= self.s.attempts_per_step:
                stop = self._supervise(step)
                if stop:
                    return stop

    def _attempt(self, step: int, attempt: int) -> dict:
        best = self.history[-1] if self.history else self.pending
        seen = pl.col("step") == step
        if not self.history:  # the failed transferred seed stays in view until v0 exists
            seen = seen | (pl.col("candidate_id") == best.candidate_id)
        failures = [Attempt(r["candidate_id"], lineage.read_source(self.run_dir, r["source_sha"]), Status(r["status"]),
                            r["decision"], r["score"], r["error"] or "", r["message"] or "")
                    for r in self.rows.filter(seen).iter_rows(named=True)]
        ctx = StepContext(step, attempt, best, list(self.history), failures, self.problem, self._bench(best),
                          self.run_dir, self.rng, set(self.tried), self.directive(), self.deadline())
        started = datetime.now(timezone.utc)
        t = time.monotonic()
        try:
            proposal = self.operator.propose(ctx)
            propose_s = time.monotonic() - t
        except ProposalError as e:
            proposal = e.proposal or Proposal("", message="")
            result = EvalResult(Status.INVALID, error=str(e))
            return self._record(step, attempt, proposal, result, "invalid", best, started, time.monotonic() - t)
        except interrupt.STOPS as e:  # the attempt in flight is on record before the search stops
            self._record(step, attempt, Proposal(""), interrupt.result(e), interrupt.INTERRUPTED, best, started,
                         time.monotonic() - t)
            raise
        try:
            result = self.evaluate(proposal.source, self.history, best)
        except interrupt.STOPS as e:
            self._record(step, attempt, proposal, interrupt.result(e), interrupt.INTERRUPTED, best, started, propose_s)
            raise
        row = self._record(step, attempt, proposal, result, self.verdict(result, self.history), best, started,
                           propose_s)
        if row["committed"]:
            self.history.append(self._version(row))
        return row

    def evaluate(self, source: str, history: list[Version], best: Version | None) -> EvalResult:
        """The harness's evaluation, timed side by side with `best` (and the commit rule's anchor,
        where that differs) once a version exists, and annotated with the paired comparison."""
        c = self.s.commit
        against = None
        if history:
            against = [best.reference("incumbent")]
            a = anchor(history)
            if c.rule == "noninferior" and a is not None and a.version != best.version:
                against.append(a.reference("anchor"))
        result = self.harness.evaluate(source, self.problem, against=against, deadline=self.deadline())
        annotate(result, c.alpha)
        return result

    def verdict(self, result: EvalResult, history: list[Version]) -> str:
        """The commit rule's decision; before any version exists, the first correct candidate is x0."""
        c = self.s.commit
        if history:
            return decide(result, c.rule, c.min_gain, c.config_margin)
        return "seed" if result.ok else "failed"

    def _record(self, step, attempt, proposal: Proposal, result: EvalResult, decision: str,
                parent: Version | None, started, propose_s: float, worker: int = 0, island: int = 0) -> dict:
        committed = decision in lineage.COMMITS
        sha = lineage.write_source(self.run_dir, proposal.source)
        return self.keep(lineage.attempt_row(
            run_id=self.run_id, step=step, attempt=attempt, parent=parent, decision=decision, result=result,
            version=(self.history[-1].version + 1 if self.history else 0) if committed else None,
            proposal=proposal, operator=self.operator if step else SEED_OPERATOR, problem=self.problem,
            directive=self.directive(island),
            started=started, propose_s=propose_s, source_sha=sha, worker=worker, island=island))

    def keep(self, row: dict) -> dict:
        """Write a row to the lineage, keep it in memory and show it (with its island's best before it)."""
        lineage.append(self.run_dir, row)
        self.rows = lineage.extended(self.rows, [row])
        self.tried.add(row["source_sha"])
        chain = self.chain(row["island"])
        self.progress.attempt(row, chain[-1].score if chain else None, self.elapsed())
        return row

    def _supervise(self, step: int, operator=None, rng=None, island: int = 0) -> str | None:
        """Review an island for a stall (its own rows since its own last intervention: one island
        committing must not hide another's stall) and redirect its operators; a reason to stop once
        every island has had search.stagnation.max_redirects interventions, else None."""
        own = pl.col("island").fill_null(0) == island
        mine = self.sup.filter(own)
        since = int(mine["step"].max()) if len(mine) else 0
        reason = detect(self.rows.filter(own), self.s.stagnation, since)
        if reason is None:
            return None
        chain = self.chain(island)
        best = chain[-1] if chain else self.pending
        operator = operator or self.operator
        ctx = StepContext(step, 0, best, chain, [], self.problem, self._bench(best), self.run_dir,
                          rng or self.rng, set(self.tried), self.directive(island), self.deadline())
        r = operator.redirect(ctx, reason) or Redirect("")
        directive = r.directive
        record = lineage.append_supervisor(self.run_dir, {"run_id": self.run_id, "step": step, "reason": reason,
                                                          "operator": operator.name, **asdict(r), "island": island})
        self.sup = lineage.extended(self.sup, [record], lineage.SUPERVISOR_SCHEMA)
        self.directives[island] = directive or self.directive(island)
        where = f" on island {island}" if self.s.islands > 1 else ""
        self.progress.line(f"supervisor at step {step}{where}: {reason}"
                           + (f" -> {directive[:200]}" if directive else ""))
        cap = self.s.stagnation.max_redirects
        counts = self.sup.group_by(pl.col("island").fill_null(0)).len()
        n = dict(zip(counts["island"].to_list(), counts["len"].to_list(), strict=True))
        if cap and all(n.get(i, 0) >= cap for i in range(self.s.islands)):
            each = " on each island" if self.s.islands > 1 else ""
            return f"stagnated: {min(n.values())} supervisor interventions{each} (search.stagnation.max_redirects)"
        return None

    def _summary(self, stopped: str) -> Summary:
        best = max((v for v in self.history if v.score is not None), key=lambda v: v.score,
                   default=self.history[-1] if self.history else None)
        attempts = self.rows.filter(lineage.ORIGINAL).height  # a migrant is a copy, not an attempt
        s = Summary(str(self.run_dir), self.run_id, int(self.rows["step"].max()), attempts,
                    int((self.rows["decision"] == "committed").sum()), best and best.version, best and best.score,
                    stopped, self.elapsed())
        self.progress.summary(s, self.rows, self.harness.ranks, [self.chain(i)[-1] for i in range(self.s.islands)]
                              if self.history and self.s.islands > 1 else [])
        return s
