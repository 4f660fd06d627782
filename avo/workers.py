"""Several operators at once on one lineage (search.workers = K > 1), as threads of one search job.

An LLM step takes minutes and its evaluation seconds, so one operator leaves the GPU idle; K
operators keep it busy, and one vLLM server batches their conversations for little more than
the cost of one.

- Steps come from one counter, and a worker runs the attempts of its step, so candidate ids stay
  `{step:05d}.{attempt:02d}` and unique. On resume, steps left unfinished are handed out first.
- A worker starts each attempt from the best version at that moment, with its own operator
  (conversation, transcript, working copy) and random stream; notes are shared (avo.agent.memory
  appends under a file lock), the lineage's lessons are read from the history it sees.
- The harness is shared: compilation and checks overlap, and the GPU workers hold the device lock
  (avo.harness.devlock) exclusively around every timed stage, so no timing overlaps another kernel.
- Decisions and records happen one at a time under `Workers.lock`. A candidate is judged against
  the best version at the moment of its decision: when another worker committed after this
  candidate's parent was taken, a candidate that beat that older parent is timed again against the
  current best while the lock is held (so the best cannot move under it); it commits only if it
  wins that comparison, and is recorded as `stale` otherwise. With search.recheck_stale=false, or
  a harness that times nothing, it is recorded as `stale` without a second timing. Two commits can
  therefore never share a parent, and every commit's parent is the best at its decision.
- With search.islands = N > 1 all of this holds per island (avo.islands): "the best" is the best of
  the worker's island, and the counter's migration steps run under the same lock. The supervisor
  reviews each island on its own (one island's commits must not hide another's stall), and its
  directions go to that island's workers only.
"""
from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta, timezone

import polars as pl

from avo import lineage
from avo.islands import island_of, migrate, migrates
from avo.types import Attempt, EvalResult, Proposal, ProposalError, Status, StepContext, Version


def unfinished_steps(rows: pl.DataFrame, per_step: int) -> list[tuple[int, int]]:
    """(step, next attempt) of every step a stopped run left before its attempts or a commit ended it."""
    done = rows.filter(pl.col("step") > 0).group_by("step").agg(pl.col("committed").any().alias("c"),
                                                                 pl.col("attempt").max().alias("a"))
    return sorted((s, a + 1) for s, c, a in done.iter_rows() if not c and a + 1 < per_step)


def busy_seconds(rows: pl.DataFrame) -> float:
    """Wall time covered by attempts (the union of their spans): the budget's clock when they overlap."""
    spans = rows.select("started_at", "finished_at").drop_nulls().sort("started_at").iter_rows()
    total, start, end = 0.0, None, None
    for a, b in spans:
        if end is None or a > end:
            total += (end - start).total_seconds() if end is not None else 0.0
            start, end = a, b
        else:
            end = max(end, b)
    return total + ((end - start).total_seconds() if end is not None else 0.0)


class Workers:
    def __init__(self, search, operators: list):
        self.search, self.ops = search, operators
        self.lock = threading.RLock()        # decisions, records, the step counter
        self.sup_lock = threading.Lock()     # one supervisor review at a time (they share its records)
        self.stop: str | None = None         # set: no worker starts another attempt
        self.finished: str | None = None     # set: no worker takes another step
        self.error: BaseException | None = None
        self.inflight: set[str] = set()      # sources proposed but not yet recorded
        rows, s = search.rows, search.s
        self.islands = s.islands
        self.reviewing = [threading.Lock() for _ in range(self.islands)]  # held while an island is reviewed
        island = pl.col("island").fill_null(0)
        self.open_steps = {i: unfinished_steps(rows.filter(island == i), s.attempts_per_step)
                           for i in range(self.islands)}  # a step resumes on its own island
        last = int(rows["step"].max()) if len(rows) else 0
        # a migration step last on record may have been cut short: it runs again for the islands it missed
        self.next_step = last if migrates(last, s) else last + 1
        self.rngs = [search.rng] + [random.Random(f"{search.cfg.rng}:{len(rows)}:w{w}")
                                    for w in range(1, len(operators))]
        # attempts overlap: the budget's clock is the union of their spans, not their sum (this session's
        # seed, if any, is already counted by search.t0)
        began = datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - search.t0)
        search.spent = busy_seconds(rows.filter(pl.col("started_at") < began))
        search.progress.workers, search.progress.islands = len(operators), self.islands

    # -- the threads ---------------------------------------------------------------------------
    def run(self) -> str:
        threads = [threading.Thread(target=self._worker, args=(w,), name=f"avo-worker-{w}", daemon=True)
                   for w in range(len(self.ops))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)  # short joins: Ctrl-C and the job's signals reach the main thread
        if self.error is not None:
            raise self.error
        return self.stop or self.finished or "every worker stopped"

    def _worker(self, w: int) -> None:
        try:
            while self.stop is None:
                taken = self._take_step(w)
                if taken is None:
                    return
                self._step(w, *taken)
        except BaseException as e:  # the first failure stops the others after their current attempt
            with self.lock:
                if self.error is None:
                    self.error = e
                self.stop = self.stop or f"worker {w} failed: {e}"

    def _take_step(self, w: int) -> tuple[int, int] | None:
        s = self.search
        with self.lock:
            why = self._out_of_time()
            if why:
                self.stop = self.stop or why
                return None
            mine = self.open_steps[island_of(w, self.islands)]
            if mine:
                return mine.pop(0)
            while True:
                if self.next_step > s.s.max_steps:
                    self.finished = f"reached search.max_steps={s.s.max_steps}"
                    return None
                self.next_step += 1
                if not migrates(self.next_step - 1, s.s):
                    return self.next_step - 1, 0
                migrate(s, self.next_step - 1, w)

    def _out_of_time(self) -> str | None:
        s = self.search
        limit = s.s.max_hours * 3600
        if s.elapsed() >= limit:
            return f"reached search.max_hours={s.s.max_hours}"
        if s.elapsed() + s.expected_eval_s() >= limit:
            return (f"reached search.max_hours={s.s.max_hours}: no time left for another evaluation "
                    f"(about {s.expected_eval_s():.0f} s)")
        return None

    def _step(self, w: int, step: int, first: int) -> None:
        for attempt in range(first, self.search.s.attempts_per_step):
            if self.stop is not None:
                return
            why = self._out_of_time()
            if why:
                self.stop = self.stop or why
                return
            if self._attempt(w, step, attempt)["committed"]:
                break
        island = island_of(w, self.islands)
        if self.reviewing[island].acquire(blocking=False):  # a review of this island now covers this step too
            try:
                with self.sup_lock:
                    why = self.search._supervise(step, self.ops[w], self.rngs[w], island)
            finally:
                self.reviewing[island].release()
            if why:
                self.stop = self.stop or why

    # -- one attempt ---------------------------------------------------------------------------
    def _attempt(self, w: int, step: int, attempt: int) -> dict:
        s, island = self.search, island_of(w, self.islands)
        with self.lock:  # the state this attempt starts from
            history = s.chain(island)
            parent = history[-1] if history else s.pending
            seen = pl.col("step") == step
            if not history:  # the failed transferred seed stays in view until v0 exists
                seen = seen | (pl.col("candidate_id") == parent.candidate_id)
            failures = [Attempt(r["candidate_id"], lineage.read_source(s.run_dir, r["source_sha"]),
                                Status(r["status"]), r["decision"], r["score"], r["error"] or "", r["message"] or "")
                        for r in s.rows.filter(seen).iter_rows(named=True)]
            ctx = StepContext(step, attempt, parent, history, failures, s.problem, s._bench(parent), s.run_dir,
                              self.rngs[w], set(s.tried) | self.inflight, s.directive(island), s.deadline())
        started = datetime.now(timezone.utc)
        t = time.monotonic()
        try:
            proposal = self.ops[w].propose(ctx)
        except ProposalError as e:
            with self.lock:
                return s._record(step, attempt, e.proposal or Proposal("", message=""),
                                 EvalResult(Status.INVALID, error=str(e)), "invalid", parent, started,
                                 time.monotonic() - t, worker=w, island=island)
        propose_s = time.monotonic() - t
        sha = lineage.sha256(proposal.source)
        with self.lock:
            self.inflight.add(sha)
        try:
            result = self.search.evaluate(proposal.source, history, parent)
            with self.lock:
                return self._decide(w, step, attempt, proposal, result, history, parent, started, propose_s)
        finally:
            with self.lock:
                self.inflight.discard(sha)

    def _decide(self, w, step, attempt, proposal: Proposal, result: EvalResult, history: list[Version],
                parent: Version, started, propose_s: float) -> dict:
        """Judge against the best of the worker's island now and record; the caller holds self.lock."""
        s, island = self.search, island_of(w, self.islands)
        decision = self.search.verdict(result, history)
        now = s.chain(island)
        if len(now) != len(history) and decision in lineage.COMMITS:  # it beat its parent; the best moved on since
            best = now[-1]
            proposal.meta.update(stale_from=parent.candidate_id, stale_ratio=result.paired_ratio,
                                 stale_lo=result.paired_lo,
                                 stale_eval_s=round(sum(getattr(result, c) for c in lineage.STAGE_COLUMNS), 3))
            parent, decision = best, "stale"
            if s.harness.ranks and s.s.recheck_stale:
                again = self.search.evaluate(proposal.source, now, best)
                proposal.meta["rechecked"] = True
                result = again
                if self.search.verdict(again, now) == "committed":
                    decision = "committed"
        row = s._record(step, attempt, proposal, result, decision, parent, started, propose_s, worker=w,
                        island=island)
        if decision in lineage.COMMITS:
            s.history.append(s._version(row))
        return row
