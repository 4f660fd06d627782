"""The search: from the seed x0, versions x1, x2, ..., each committed only when it passes the harness and,
timed side by side with its island's head, passes the commit rule (avo.commit: by default, significantly
faster).

`run_search` opens the run directory (its lineage read back into avo.state, so a restarted run continues
where the last row that reached disk left off), evaluates the seed once and hands the loop to avo.workers,
whose smallest case is one worker on one island. `Search` is what every worker and migration does through:
build a step's context, evaluate a candidate beside its island's head, decide, record, supervise.
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

from avo import lineage, transfer
from avo.commit import anchor, decide
from avo.errors import SearchError
from avo.harness import HarnessBench, make_harness
from avo.history import NOT_SIDE_BY_SIDE
from avo.operators import make_operators
from avo.paired import annotate
from avo.problem import problem_from_cfg
from avo.progress import Progress
from avo.schema import ORIGINAL, attempt_row
from avo.seeds import Seed, resolve
from avo.stagnation import detect
from avo.state import LineageState
from avo.types import COMMITS, Decision, EvalResult, Problem, Proposal, Redirect, StepContext, Version
from avo.workers import Workers

SEED_OPERATOR = SimpleNamespace(name="seed", model="")  # what the seed's rows name: no operator proposed it


@dataclass
class Summary:
    run_dir: str
    run_id: str
    steps: int
    attempts: int
    commits: int
    best_version: int | None       # avo.history's best: the head (several islands: the highest chain)
    best_score: float | None       # its own evaluation's geomean TFLOPS
    best_ratio: float | None       # its speed over v0, chained paired ratios
    stopped: str
    elapsed_s: float


def run_search(cfg: DictConfig) -> Summary:
    run_dir = Path(cfg.resume or cfg.run_dir).expanduser().resolve()
    problem = problem_from_cfg(cfg.kernel)
    info = _open_run(cfg, run_dir, problem)
    harness = make_harness(cfg.harness, run_dir / "work", commit=cfg.search.commit)
    try:
        operators = make_operators(cfg.agent, run_dir, problem, int(cfg.search.workers))
    except BaseException:
        harness.close()
        raise
    try:
        return Search(cfg, run_dir, info["run_id"], problem, harness, operators).run()
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
                "agent": cfg.agent.name, "operator": cfg.agent.kind, "model": cfg.agent.model,
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
    def __init__(self, cfg, run_dir: Path, run_id: str, problem: Problem, harness, operators: list):
        self.cfg, self.s = cfg, cfg.search
        self.run_dir, self.run_id, self.problem = run_dir, run_id, problem
        self.harness, self.operators = harness, list(operators)  # one per worker (search.workers)
        self.state = LineageState(run_dir)
        if self.state.islands > self.s.islands:
            n = self.state.islands
            raise SearchError(f"{run_dir} holds {n} islands; resume it with search.islands={n} "
                              f"(not {self.s.islands}), or start a new run directory")
        self.rng = random.Random(f"{cfg.rng}:{len(self.state.rows)}")
        self.progress = Progress(run_id, harness.ranks, workers=len(self.operators), islands=self.s.islands)

    def run(self) -> Summary:
        st = self.state
        if not st.versions and st.pending is None:
            self.seed()
        elif st.versions:
            self.progress.resumed(st.rows, st.best())
        return self.summary(Workers(self).run())

    def seed(self) -> None:
        seed: Seed = resolve(self.cfg.seed)
        seed.check(self.problem.head_dim, self.harness.arch)
        rows = self.state.rows
        attempt = 0 if rows.is_empty() else int(rows["attempt"].max()) + 1
        self.progress.line(f"evaluating the seed {seed.origin} on {self.problem.name} "
                           f"(Hq={self.problem.heads_q}, Hkv={self.problem.heads_kv}, d={self.problem.head_dim})")
        if seed.note:
            self.progress.line(seed.note)
        if seed.run_dir is not None:
            transfer.carry_knowledge(seed.run_dir, self.run_dir)
        started = datetime.now(timezone.utc)
        result = self.harness.evaluate(seed.source, self.problem)
        note = transfer.compiler_note(seed.run_dir, result.compiler) if seed.run_dir is not None else None
        if note:
            self.progress.line(note)
        proposal = Proposal(seed.source, message=f"seed {seed.origin}",
                            meta=transfer.seed_meta(seed.run_dir, seed.version))
        row = self.record(0, attempt, proposal, result, Decision.SEED if result.ok else Decision.FAILED, None,
                          started, 0.0)
        if result.ok:
            return
        if seed.run_dir is None:
            raise SearchError(f"the seed {seed.origin} does not pass harness={self.harness.name} "
                              f"({result.status.value}): {result.error.splitlines()[0] if result.error else ''}")
        self.state.adapt(row)
        self.progress.line(f"the transferred seed {seed.origin} fails on {self.problem.name} "
                           f"({result.status.value}); adapting it comes first: the first correct "
                           "candidate becomes v0")

    # -- what a worker does through the search -------------------------------------------------------
    def context(self, step: int, attempt: int, island: int, rng: random.Random, tried=()) -> StepContext:
        """What an operator is given for one attempt (or one review) on its island."""
        st = self.state
        best = st.start(island)
        return StepContext(step, attempt, best, st.chain(island), st.failures(step), self.problem, self.bench(best),
                           self.run_dir, rng, st.tried | set(tried), st.directive(island), self.deadline(),
                           st.recent(island), st.directions(island))

    def bench(self, best: Version | None) -> HarnessBench:
        """What the operator may do with the harness in a step: bound to the problem and the incumbent."""
        inc = best.reference("incumbent") if best is not None and self.state.versions else None
        return HarnessBench(self.harness, self.problem, inc, self.deadline(), self.s.commit.alpha)

    def deadline(self) -> float:
        """time.monotonic() at which search.max_hours runs out."""
        return time.monotonic() + self.s.max_hours * 3600 - self.state.elapsed()

    def out_of_time(self) -> str | None:
        """Why no further evaluation may start (search.max_hours), or None."""
        limit, now, need = self.s.max_hours * 3600, self.state.elapsed(), self.state.expected_eval_s()
        if now >= limit:
            return f"reached search.max_hours={self.s.max_hours}"
        if now + need >= limit:
            return (f"reached search.max_hours={self.s.max_hours}: no time left for another evaluation "
                    f"(about {need:.0f} s)")
        return None

    def evaluate(self, source: str, chain: list[Version], best: Version | None) -> EvalResult:
        """The harness's evaluation, timed side by side with `best` (and the commit rule's anchor, where
        that differs) once a version exists, and annotated with the paired comparison."""
        c = self.s.commit
        against = None
        if chain:
            against = [best.reference("incumbent")]
            a = anchor(chain)
            if c.rule == "noninferior" and a is not None and a.version != best.version:
                against.append(a.reference("anchor"))
        result = self.harness.evaluate(source, self.problem, against=against, deadline=self.deadline())
        annotate(result, c.alpha)
        return result

    def verdict(self, result: EvalResult, chain: list[Version], rule: str | None = None) -> Decision:
        """The commit rule's decision; before any version exists, the first correct candidate is x0."""
        c = self.s.commit
        if chain:
            return decide(result, rule or c.rule, c.min_gain, c.config_margin)
        return Decision.SEED if result.ok else Decision.FAILED

    def record(self, step: int, attempt: int, proposal: Proposal, result: EvalResult, decision: str,
               parent: Version | None, started, propose_s: float, operator=None, worker: int = 0,
               island: int = 0) -> dict:
        """Write one row (a version when the decision commits) and show it."""
        st = self.state
        row = attempt_row(
            run_id=self.run_id, step=step, attempt=attempt, parent=parent, decision=decision, result=result,
            version=st.next_version() if Decision(decision) in COMMITS else None, proposal=proposal,
            operator=(operator or self.operators[0]) if step else SEED_OPERATOR, problem=self.problem,
            directive=st.directive(island),
            started=started, propose_s=propose_s, source_sha=lineage.write_source(self.run_dir, proposal.source),
            worker=worker, island=island)
        st.commit(row) if row["committed"] else st.record(row)
        self.progress.attempt(row, st.head(island), st.elapsed())
        return row

    def supervise(self, step: int, island: int, operator, rng: random.Random) -> str | None:
        """Review an island for a stall (its own rows since its own last intervention: one island
        committing must not hide another's stall) and redirect its operators; a reason to stop once
        every island has had search.stagnation.max_redirects interventions, else None."""
        st = self.state
        mine = st.sup.filter(st.own(island))
        reason = detect(st.rows.filter(st.own(island)), self.s.stagnation, int(mine["step"].max()) if len(mine) else 0)
        if reason is None:
            return None
        r = operator.redirect(self.context(step, 0, island, rng), reason) or Redirect("")
        st.intervene({"run_id": self.run_id, "step": step, "reason": reason, "operator": operator.name, **asdict(r),
                      "island": island})
        where = f" on island {island}" if self.s.islands > 1 else ""
        self.progress.line(f"supervisor at step {step}{where}: {reason}"
                           + (f" -> {r.directive[:200]}" if r.directive else ""))
        cap = self.s.stagnation.max_redirects
        counts = st.sup.group_by(pl.col("island").fill_null(0)).len()
        n = dict(zip(counts["island"].to_list(), counts["len"].to_list(), strict=True))
        if cap and all(n.get(i, 0) >= cap for i in range(self.s.islands)):
            each = " on each island" if self.s.islands > 1 else ""
            return f"stagnated: {min(n.values())} supervisor interventions{each} (search.stagnation.max_redirects)"
        return None

    def summary(self, stopped: str) -> Summary:
        st = self.state
        best = st.best()
        tried = st.rows.filter((pl.col("step") > 0) & ORIGINAL)  # attempts: not the seed, not a migration's rows
        s = Summary(str(self.run_dir), self.run_id, int(st.rows["step"].max()), len(tried),
                    int((tried["decision"] == Decision.COMMITTED).sum()), best and best.version, best and best.score,
                    best and best.chain_ratio, stopped, st.elapsed())
        heads = [st.head(i) for i in range(self.s.islands)] if st.versions and self.s.islands > 1 else []
        note = NOT_SIDE_BY_SIDE.format(n=self.s.islands) if len({h.version for h in heads}) > 1 else ""
        self.progress.summary(s, st.rows, self.harness.ranks, heads, note)
        return s
