"""The search loop: K operators at once on one lineage (search.workers), K = 1 its smallest case.

An LLM step takes minutes and its evaluation seconds, so one operator leaves the GPU idle; K
operators keep it busy, and one vLLM server batches their conversations for little more than
the cost of one. One worker runs the same loop in the calling thread.

- Steps come from one counter, and a worker runs the attempts of its step, so candidate ids stay
  `{step:05d}.{attempt:02d}` and unique. On resume, steps left unfinished are handed out first.
- A worker starts each attempt from its island's head at that moment, with its own operator
  (conversation, transcript, working copy) and random stream; notes are shared (avo.agent.memory
  appends under a file lock), the lineage's lessons are read from the history it sees.
- The harness is shared: compilation and checks overlap, and the GPU workers hold the device lock
  (avo.harness.devlock) exclusively around every timed stage, so no timing overlaps another kernel.
- Decisions and records happen one at a time under `Workers.lock`. A candidate is judged against
  its island's head at the moment of its decision: when another worker committed after this
  candidate's parent was taken, a candidate that beat that older parent is timed again against the
  current head while the lock is held (so the head cannot move under it); it commits only if it
  wins that comparison, and is recorded as `stale` otherwise. With search.recheck_stale=false, or
  a harness that times nothing, it is recorded as `stale` without a second timing. Two commits can
  therefore never share a parent, and every commit's parent is the head at its decision.
- With search.islands = N > 1 all of this holds per island (avo.islands): worker w works on island
  w mod N, and the counter's migration steps run under the same lock. The supervisor reviews each
  island on its own (one island's commits must not hide another's stall), and its directions go to
  that island's workers only.
"""
from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timezone
from typing import NamedTuple

import polars as pl

from avo import interrupt, lineage
from avo.islands import island_of, migrate, migrates
from avo.schema import STAGE_COLUMNS
from avo.types import COMMITS, Decision, EvalResult, Proposal, ProposalError, Status, Version


def unfinished_steps(rows: pl.DataFrame, per_step: int) -> list[tuple[int, int]]:
    """(step, next attempt) of every step a stopped run left before its attempts or a commit ended it."""
    done = rows.filter(pl.col("step") > 0).group_by("step").agg(pl.col("committed").any().alias("c"),
                                                                 pl.col("attempt").max().alias("a"))
    return sorted((s, a + 1) for s, c, a in done.iter_rows() if not c and a + 1 < per_step)


class Flight(NamedTuple):
    """A worker's attempt in flight: what a stop signal records for it (propose_s None: still proposing)."""
    step: int
    attempt: int
    proposal: Proposal
    parent: Version
    started: datetime
    t0: float
    propose_s: float | None = None


class Queued(NamedTuple):
    """A proposal drawn ahead of its attempt (Workers._fill) and compiling meanwhile (avo.harness.ahead)."""
    proposal: Proposal
    parent: str | None  # the candidate id of the head it varies: it is dropped once that is not the head
    propose_s: float


class Workers:
    def __init__(self, search):
        self.search, self.ops = search, search.operators
        self.lock = threading.RLock()        # decisions, records, the step counter
        self.sup_lock = threading.Lock()     # one supervisor review at a time (they share its records)
        self.stop: str | None = None         # set: no worker starts another attempt
        self.finished: str | None = None     # set: no worker takes another step
        self.error: BaseException | None = None
        self.inflight: set[str] = set()      # sources proposed but not yet recorded
        self.flight: dict[int, Flight] = {}  # worker -> its attempt in flight
        self.disowned: set[int] = set()      # workers whose attempt a stop signal recorded: they record nothing
        self.signalled = False               # a stop signal reached the main thread: no review after it
        rows, s = search.state.rows, search.s
        self.islands = s.islands
        self.reviewing = [threading.Lock() for _ in range(self.islands)]  # held while an island is reviewed
        island = pl.col("island").fill_null(0)
        self.open_steps = {i: unfinished_steps(rows.filter(island == i), s.attempts_per_step)
                           for i in range(self.islands)}  # a step resumes on its own island
        last = int(rows["step"].max()) if len(rows) else 0
        # a migration step last on record may have been cut short: it runs again for the islands it missed
        self.next_step = last if migrates(last, s) else last + 1
        self.rngs = [search.rng] + [random.Random(f"{search.cfg.rng}:{len(rows)}:w{w}")
                                    for w in range(1, len(self.ops))]
        # proposals drawn ahead per worker: an operator that allows it (agent.ahead), a harness that compiles ahead
        compiles = getattr(search.harness, "ahead", None) is not None
        self.ahead = [int(getattr(op, "ahead", 0)) if compiles else 0 for op in self.ops]
        self.queued: dict[int, list[Queued]] = {w: [] for w in range(len(self.ops))}

    # -- the threads ---------------------------------------------------------------------------
    def run(self) -> str:
        if len(self.ops) == 1:
            self._worker(0)
        else:
            threads = [threading.Thread(target=self._worker, args=(w,), name=f"avo-worker-{w}", daemon=True)
                       for w in range(len(self.ops))]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(0.5)  # short joins: Ctrl-C and the job's signals reach the main thread
            except interrupt.STOPS as e:
                self._drain(threads, e)
                raise
        if self.error is not None:
            raise self.error
        return self.stop or self.finished or "every worker stopped"

    def _drain(self, threads: list[threading.Thread], e: BaseException) -> None:
        """A stop signal reached the main thread: let the attempts in flight end (bounded), then record the
        ones still running as interrupted and disown them. Leaving while a worker is inside the compiler
        would abort the process when the interpreter exits, and the harness closes after this."""
        with self.lock:
            self.stop, self.signalled = self.stop or interrupt.reason(e), True
        deadline = time.monotonic() + interrupt.GRACE_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            for w, f in sorted(self.flight.items()):
                self._record(w, f.step, f.attempt, f.proposal, interrupt.result(e), Decision.INTERRUPTED, f.parent,
                             f.started, time.monotonic() - f.t0 if f.propose_s is None else f.propose_s)
                self.disowned.add(w)
            self.flight.clear()

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
            if self._out_of_time():
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

    def _out_of_time(self) -> bool:
        why = self.search.out_of_time()
        if why:
            self.stop = self.stop or why
        return why is not None

    def _step(self, w: int, step: int, first: int) -> None:
        for attempt in range(first, self.search.s.attempts_per_step):
            if self.stop is not None or self._out_of_time():
                return
            if self._attempt(w, step, attempt)["committed"]:
                break
        island = island_of(w, self.islands)
        if self.signalled:
            return
        if self.reviewing[island].acquire(blocking=False):  # a review of this island now covers this step too
            try:
                with self.sup_lock:
                    why = self.search.supervise(step, island, self.ops[w], self.rngs[w])
            finally:
                self.reviewing[island].release()
            if why:
                self.stop = self.stop or why

    # -- one attempt ---------------------------------------------------------------------------
    def _attempt(self, w: int, step: int, attempt: int) -> dict:
        s, island = self.search, island_of(w, self.islands)
        started = datetime.now(timezone.utc)
        t = time.monotonic()
        with self.lock:  # the state this attempt starts from
            chain = s.state.chain(island)
            parent = s.state.start(island)
            ctx = s.context(step, attempt, island, self.rngs[w], self.inflight)
            self.flight[w] = Flight(step, attempt, Proposal(""), parent, started, t)
        try:
            try:
                proposal, propose_s = self._proposal(w, ctx, parent, t)
            except ProposalError as e:
                return self._record(w, step, attempt, e.proposal or Proposal("", message=""),
                                    EvalResult(Status.INVALID, error=str(e)), Decision.INVALID, parent, started,
                                    time.monotonic() - t)
            except interrupt.STOPS as e:  # the attempt in flight is on record before the search stops
                self._record(w, step, attempt, Proposal(""), interrupt.result(e), Decision.INTERRUPTED, parent,
                             started, time.monotonic() - t)
                raise
            sha = lineage.sha256(proposal.source)
            with self.lock:
                self.inflight.add(sha)
                self.flight[w] = self.flight[w]._replace(proposal=proposal, propose_s=propose_s)
            try:
                try:
                    self._fill(w, ctx, parent)  # the next ones compile while this one is evaluated
                    result = s.evaluate(proposal.source, chain, parent)
                except interrupt.STOPS as e:
                    self._record(w, step, attempt, proposal, interrupt.result(e), Decision.INTERRUPTED, parent,
                                 started, propose_s)
                    raise
                with self.lock:
                    if w in self.disowned:
                        return {"committed": False}
                    return self._decide(w, step, attempt, proposal, result, chain, parent, started, propose_s)
            finally:
                with self.lock:
                    self.inflight.discard(sha)
        finally:
            with self.lock:
                self.flight.pop(w, None)

    # -- proposals drawn ahead -----------------------------------------------------------------
    def _proposal(self, w: int, ctx, parent: Version | None, t: float) -> tuple[Proposal, float]:
        """This attempt's proposal and the seconds it took: the next one the worker drew ahead (drawn now if none
        waits, so that it too is checked against every worker's), else the operator's answer to this context."""
        with self.lock:
            queued = self._take_queued(w, parent)
        if queued is None and self.ahead[w]:
            self._fill(w, ctx, parent)
            with self.lock:
                queued = self._take_queued(w, parent)
        if queued is not None:
            return queued.proposal, queued.propose_s
        return self.ops[w].propose(ctx), time.monotonic() - t

    def _take_queued(self, w: int, parent: Version | None) -> Queued | None:
        """The worker's next proposal drawn ahead, if it still varies the head; the caller holds self.lock. The
        head moved on since they were drawn: all of them are dropped (their compiles forgotten)."""
        queue, head = self.queued[w], parent.candidate_id if parent else None
        if queue and queue[0].parent != head:
            for q in queue:
                self.inflight.discard(lineage.sha256(q.proposal.source))
                self.search.harness.ahead.forget(q.proposal.source)
            queue.clear()
        return queue.pop(0) if queue else None

    def _fill(self, w: int, ctx, parent: Version | None) -> None:
        """Draw proposals from this attempt's context until agent.ahead of them wait, and start compiling each.
        An operator that runs out says so again when an attempt of its own asks it, and that is recorded."""
        head, queue = parent.candidate_id if parent else None, self.queued[w]
        while len(queue) < self.ahead[w] and self.stop is None:
            t = time.monotonic()
            try:
                proposal = self.ops[w].propose(ctx)
            except ProposalError:
                return
            sha = lineage.sha256(proposal.source)
            ctx.tried.add(sha)  # the next draw from this context must differ
            with self.lock:
                if sha in self.inflight or sha in self.search.state.tried:  # another worker drew it since ctx
                    continue
                self.inflight.add(sha)
                queue.append(Queued(proposal, head, time.monotonic() - t))
            self.search.harness.ahead.start(proposal.source, self.search.problem)

    def _record(self, w: int, step: int, attempt: int, proposal: Proposal, result: EvalResult, decision: str,
                parent: Version, started, propose_s: float) -> dict:
        with self.lock:
            if w in self.disowned:  # a stop signal recorded this attempt already
                return {"committed": False}
            return self.search.record(step, attempt, proposal, result, decision, parent, started, propose_s,
                                      self.ops[w], w, island_of(w, self.islands))

    def _decide(self, w, step, attempt, proposal: Proposal, result: EvalResult, chain: list[Version],
                parent: Version, started, propose_s: float) -> dict:
        """Judge against the head of the worker's island now and record; the caller holds self.lock."""
        s, island = self.search, island_of(w, self.islands)
        decision = s.verdict(result, chain)
        head = s.state.head(island)
        moved = (head and head.candidate_id) != (chain[-1].candidate_id if chain else None)
        if moved and decision in COMMITS:  # it beat its parent (or would be v0); the head moved on since
            proposal.meta.update(stale_from=parent.candidate_id, stale_ratio=result.paired_ratio,
                                 stale_lo=result.paired_lo,
                                 stale_eval_s=round(sum(getattr(result, c) for c in STAGE_COLUMNS), 3))
            parent, decision = head, Decision.STALE
            if s.harness.ranks and s.s.recheck_stale:
                now = s.state.chain(island)
                result = s.evaluate(proposal.source, now, head)
                proposal.meta["rechecked"] = True
                if s.verdict(result, now) == Decision.COMMITTED:
                    decision = Decision.COMMITTED
        return s.record(step, attempt, proposal, result, decision, parent, started, propose_s, self.ops[w], w,
                        island)
