"""search.workers: several operators at once on one lineage.

The commit serialisation is checked with scoring doubles (pure logic, deterministic races); ids,
records and kill/resume run the real mutation operator and the real NVRTC harness."""
import json
import sys
import threading
import time

import polars as pl
import pytest

from avo import lineage
from avo.clock import busy_seconds
from avo.contract import set_tunables
from avo.operators import make_operators
from avo.problem import problem_from_cfg
from avo.schema import to_frame
from avo.search import Search, _open_run, run_search
from avo.types import Proposal
from avo.workers import unfinished_steps
from tests.conftest import DATA, kill_and_resume
from tests.test_search import SEED, ScoreHarness

SEED_SRC = (DATA / "tunable.cu").read_text()


class RacingHarness(ScoreHarness):
    """ScoreHarness, thread-safe, whose evaluations take a while so workers overlap. Test double only."""

    def __init__(self, delay=0.02):
        super().__init__()
        self.delay, self.lock = delay, threading.Lock()

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        time.sleep(self.delay * (1 + hash(source) % 3))
        with self.lock:
            return super().evaluate(source, problem, mode, against, deadline)


class GatedHarness(ScoreHarness):
    """The first `n` evaluations wait for each other (all timed against the same best); later ones
    are delayed per source so the order of decisions is fixed. Test double only."""

    def __init__(self, n, delays):
        super().__init__()
        self.barrier, self.n, self.delays, self.lock = threading.Barrier(n, timeout=30), n, delays, threading.Lock()

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        with self.lock:
            first = self.calls < self.n + 1  # +1: the seed
            r = super().evaluate(source, problem, mode, against, deadline)
        if first and against:
            self.barrier.wait()
            time.sleep(self.delays.get(source, 0.0))
        return r


class Fixed:
    """An operator that proposes one fixed source. Test double only."""
    name, model = "fixed", ""

    def __init__(self, source):
        self.source = source

    def propose(self, ctx):
        return Proposal(self.source, message="fixed")

    def redirect(self, ctx, reason):
        return None

    def close(self):
        pass


def search(cfg_factory, run_dir, harness, operators, *overrides):
    cfg = cfg_factory("harness=compile", f"seed={SEED}", *overrides, run_dir=run_dir)
    problem = problem_from_cfg(cfg.kernel)
    info = _open_run(cfg, run_dir, problem)
    if operators is None:
        operators = make_operators(cfg.agent, run_dir, problem, int(cfg.search.workers))
    return Search(cfg, run_dir, info["run_id"], problem, harness, operators).run()


def assert_one_lineage(df: pl.DataFrame) -> None:
    """Unique ids; commits form one chain: each commit's parent is the previous version (the best at its decision)."""
    assert df["candidate_id"].is_unique().all()
    commits = df.filter(pl.col("committed")).sort("version")
    assert commits["version"].to_list() == list(range(len(commits)))
    ids = commits["candidate_id"].to_list()
    assert commits["parent_id"].to_list()[1:] == ids[:-1], "a commit's parent was not the best at its decision"
    assert commits["parent_id"].drop_nulls().is_unique().all(), "two commits against the same parent"
    assert (commits["finished_at"].diff().drop_nulls().dt.total_microseconds() >= 0).all()


def test_four_workers_keep_one_lineage_and_judge_against_the_current_best(cfg_factory, tmp_path):
    summary = search(cfg_factory, tmp_path, RacingHarness(), None, "search.workers=4", "search.max_steps=24",
                     "search.attempts_per_step=2")
    df = lineage.read_run(tmp_path)
    assert_one_lineage(df)
    assert summary.commits >= 2 and summary.attempts == len(df) - 1
    assert set(df.filter(pl.col("step") > 0)["worker"]) == {0, 1, 2, 3}
    assert sorted(df.filter(pl.col("step") > 0)["step"].unique()) == list(range(1, 25))
    # steps are one worker's each, and its attempts are contiguous
    per = df.filter(pl.col("step") > 0).group_by("step").agg(pl.col("worker").n_unique().alias("w"),
                                                              pl.col("attempt").max().alias("a"), pl.len())
    assert (per["w"] == 1).all() and (per["a"] + 1 == per["len"]).all()
    # a rejected candidate lost against the parent it was timed with
    lost = df.filter(pl.col("decision") == "not_faster")
    assert (lost["score"] <= lost["best_before"]).all()


@pytest.mark.parametrize("recheck", [True, False])
def test_a_candidate_that_beat_an_older_best_is_rechecked_or_recorded_stale(cfg_factory, tmp_path, recheck):
    fast = set_tunables(SEED_SRC, {"BLOCK_M": "128"})       # 100 + 32 + ... : the best
    faster_than_seed = set_tunables(SEED_SRC, {"BLOCK_N": "128"})  # better than the seed, worse than `fast`
    h = GatedHarness(2, {faster_than_seed: 0.3})  # both timed against v0; `fast` decides first
    search(cfg_factory, tmp_path, h, [Fixed(fast), Fixed(faster_than_seed)], "search.workers=2",
           "search.max_steps=2", "search.attempts_per_step=1", f"search.recheck_stale={recheck}")
    df = lineage.read_run(tmp_path).filter(pl.col("step") > 0).sort("finished_at")
    first, second = df.row(0, named=True), df.row(1, named=True)
    assert first["decision"] == "committed" and first["parent_id"] == "00000.00"
    assert second["decision"] == "stale" and second["parent_id"] == first["candidate_id"]
    extra = json.loads(second["extra"])
    assert extra["stale_from"] == "00000.00" and extra["stale_lo"] > 1.0
    assert extra.get("rechecked", False) == recheck
    assert h.calls == 3 + recheck  # the seed, two candidates, and the re-timing
    if recheck:  # re-timed against the current best, which it does not beat
        assert second["paired_ratio"] < 1.0 and second["best_before"] == first["score"]


def test_a_stale_candidate_that_beats_the_current_best_commits_on_its_parent(cfg_factory, tmp_path):
    fast = set_tunables(SEED_SRC, {"BLOCK_M": "128"})
    slower = set_tunables(SEED_SRC, {"BLOCK_N": "128"})
    h = GatedHarness(2, {fast: 0.3})  # the slower one commits first; `fast` then beats it too
    search(cfg_factory, tmp_path, h, [Fixed(fast), Fixed(slower)], "search.workers=2", "search.max_steps=2",
           "search.attempts_per_step=1")
    df = lineage.read_run(tmp_path)
    assert_one_lineage(df)
    assert df.filter(pl.col("committed")).sort("version")["source_sha"].to_list()[1:] == [lineage.sha256(slower),
                                                                          lineage.sha256(fast)]
    assert json.loads(df.filter(pl.col("version") == 2)["extra"][0])["rechecked"] is True


def test_one_worker_is_the_single_loop(cfg_factory, tmp_path, capsys):
    summary = search(cfg_factory, tmp_path, ScoreHarness(), None, "search.max_steps=5")
    df = lineage.read_run(tmp_path)
    assert df["worker"].to_list() == [0] * len(df) and df["island"].to_list() == [0] * len(df)
    assert " w0 " not in capsys.readouterr().out and summary.attempts == len(df) - 1


def test_overlapping_attempts_count_once_against_the_budget(cfg_factory, tmp_path):
    search(cfg_factory, tmp_path, RacingHarness(0.05), None, "search.workers=3", "search.max_steps=6")
    df = lineage.read_run(tmp_path)
    spans = (df["finished_at"] - df["started_at"]).dt.total_seconds(fractional=True).sum()
    wall = (df["finished_at"].max() - df["started_at"].min()).total_seconds()
    assert busy_seconds(df) <= wall + 1e-6 < spans  # the workers overlapped; the budget counts wall time


def test_unfinished_steps_are_the_ones_a_kill_cut_short():
    rows = [dict(step=s, attempt=a, candidate_id=f"{s:05d}.{a:02d}", committed=c) for s, a, c in
            [(0, 0, True), (1, 0, False), (1, 1, True), (2, 0, False), (3, 0, False), (3, 1, False),
             (3, 2, False), (4, 0, False), (4, 1, False)]]
    assert unfinished_steps(to_frame(rows), 3) == [(2, 1), (4, 2)]


def test_four_workers_on_the_nvrtc_harness(cfg_factory, tmp_path, capsys):
    cfg = cfg_factory("harness=compile", f"seed={SEED}", "search.workers=4", "search.max_steps=8",
                      "search.attempts_per_step=2", run_dir=tmp_path)
    summary = run_search(cfg)
    df = lineage.read_run(tmp_path)
    assert summary.attempts + 1 == len(df) == 1 + 16 and df["candidate_id"].is_unique().all()
    assert set(df["decision"][1:]) <= {"unranked", "invalid"} and len(set(df["worker"][1:])) > 1
    assert df.filter(pl.col("step") > 0)["registers"].min() > 0
    out = capsys.readouterr().out
    assert " w3 step" in out or " w2 step" in out
    assert not list((tmp_path / "work").glob(".spare-*"))


def test_a_killed_four_worker_run_resumes_without_loss_or_duplicates(tmp_path):
    args = [sys.executable, "-m", "avo.launch", "harness=compile", f"seed={SEED}", "search.workers=4"]
    _, after, last, _ = kill_and_resume(args, tmp_path)
    steps = after.filter(pl.col("step") > 0).group_by("step").agg(pl.col("attempt").sort().alias("a"))
    assert sorted(steps["step"]) == list(range(1, last + 3))
    assert all(a.to_list() == list(range(3)) for a in steps["a"]), "every step ran its attempts once each"


def test_analysis_shows_attempts_per_worker_gpu_busy_and_commits_over_time(cfg_factory, tmp_path, capsys):
    from avo.analyze import main

    search(cfg_factory, tmp_path / "run", RacingHarness(), None, "search.workers=3", "search.max_steps=9")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "attempts_per_h" in out and "busy" in out
    per = pl.read_csv(tmp_path / "out" / "workers.csv")
    assert sorted(per["worker"]) == [0, 1, 2] and per["attempts"].sum() == len(lineage.read_run(tmp_path / "run")) - 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Workers" in report and "commits_by_worker.png" in report


def test_the_budget_clock_counts_each_second_once_after_a_resume(cfg_factory, tmp_path):
    from avo.workers import Workers

    search(cfg_factory, tmp_path, RacingHarness(), None, "search.workers=3", "search.max_steps=4")
    cfg = cfg_factory("harness=compile", f"seed={SEED}", "search.workers=3", run_dir=tmp_path)
    problem = problem_from_cfg(cfg.kernel)
    ops = make_operators(cfg.agent, tmp_path, problem, 3)
    s = Search(cfg, tmp_path, _open_run(cfg, tmp_path, problem)["run_id"], problem, RacingHarness(), ops)
    Workers(s)
    assert s.state.spent == pytest.approx(busy_seconds(lineage.read_run(tmp_path)))
    assert s.state.spent < s.state.rows.select((pl.col("finished_at") - pl.col("started_at")).dt.total_seconds(
        fractional=True).sum()).item()


def test_one_worker_is_the_smallest_case_of_the_one_loop(cfg_factory, tmp_path, monkeypatch):
    """search.workers=1 runs avo.workers' loop in the calling thread: no second loop, no thread."""
    started = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or start(self))
    summary = search(cfg_factory, tmp_path, ScoreHarness(), None, "search.max_steps=4")
    assert summary.stopped == "reached search.max_steps=4" and not [n for n in started if n.startswith("avo-worker")]


def test_the_core_and_migrations_use_only_the_lineage_states_public_api():
    """Workers and islands once called Search's private methods and appended to its history."""
    import re

    from tests.conftest import ROOT

    for name in ("workers.py", "islands.py"):
        text = (ROOT / "avo" / name).read_text()
        private = re.findall(r"\b(?:s|search|st|state|self\.search)\.(_\w+)", text)
        assert not private, f"avo/{name} reaches into {private}"
        assert ".versions.append(" not in text and ".rows = " not in text


class Signalling(Fixed):
    """Once `ready` is set, sends this process SIGTERM and stays in its step past the stop's grace. Test double only."""

    def __init__(self, source, ready, hold_s):
        super().__init__(source)
        self.ready, self.hold_s, self.returned = ready, hold_s, threading.Event()

    def propose(self, ctx):
        import os
        import signal

        self.ready.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.hold_s)
        self.returned.set()
        return super().propose(ctx)


class Announcing(RacingHarness):
    """RacingHarness that sets `ready` when a candidate's evaluation starts. Test double only."""

    def __init__(self, ready, delay):
        super().__init__(delay)
        self.ready = ready

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        if against:
            self.ready.set()
        return super().evaluate(source, problem, mode, against, deadline)


def test_a_stop_signal_lets_the_attempts_in_flight_end_and_records_the_ones_past_its_grace(
        cfg_factory, tmp_path, monkeypatch):
    """The CI once aborted ("exception not rethrown") when the interpreter exited while a worker was still in
    native code: a signal now waits for the other workers (bounded), and one still busy after the grace is
    recorded as interrupted and disowned, so nothing it does later reaches the lineage."""
    from avo import interrupt

    monkeypatch.setattr(interrupt, "GRACE_S", 3.0)
    ready = threading.Event()
    fast = set_tunables(SEED_SRC, {"BLOCK_M": "128"})
    slow = Signalling(set_tunables(SEED_SRC, {"BLOCK_N": "128"}), ready, hold_s=6.0)
    with pytest.raises(interrupt.Interrupted), interrupt.on_signals():
        search(cfg_factory, tmp_path, Announcing(ready, 0.2), [Fixed(fast), slow], "search.workers=2",
               "search.max_steps=50", "search.attempts_per_step=1")
    rows = lineage.read_run(tmp_path).filter(pl.col("step") > 0)
    by_worker = {w: r["decision"].to_list() for w, r in rows.group_by("worker")}
    assert by_worker[(0,)] == ["committed"], by_worker  # its evaluation ended inside the grace: judged
    assert by_worker[(1,)] == ["interrupted"], by_worker
    assert "interrupted by SIGTERM" in rows.filter(pl.col("worker") == 1)["error"][0]
    assert slow.returned.wait(10)
    time.sleep(0.5)  # the disowned worker evaluates its proposal now, and must record nothing
    assert lineage.read_run(tmp_path).filter(pl.col("step") > 0).height == 2


class AheadHarness(RacingHarness):
    """RacingHarness that says which sources a worker asked it to compile ahead, and which it forgot, in the
    order of the calls beside the evaluations. Test double only."""

    def __init__(self):
        super().__init__(delay=0.005)
        self.ahead, self.events = self, []

    def start(self, source, problem):
        with self.lock:
            self.events.append(("start", source))

    def forget(self, source):
        with self.lock:
            self.events.append(("forget", source))

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        with self.lock:
            self.events.append(("evaluate", source))
        return super().evaluate(source, problem, mode, against, deadline)


@pytest.mark.parametrize("workers,ahead", [(1, 2), (3, 2), (3, 0)])
def test_proposals_drawn_ahead_are_compiled_first_and_dropped_when_the_head_moves(cfg_factory, tmp_path, workers,
                                                                                   ahead):
    h = AheadHarness()
    search(cfg_factory, tmp_path, h, None, f"search.workers={workers}", "search.max_steps=14",
           "search.attempts_per_step=3", f"agent.ahead={ahead}")
    df = lineage.read_run(tmp_path)
    assert_one_lineage(df)
    evaluated_rows = df.filter((pl.col("step") > 0) & (pl.col("decision") != "invalid"))
    # drawn through the queue, a proposal is checked against every worker's in flight and on record
    assert evaluated_rows["source_sha"].is_unique().all() or not ahead
    started, forgotten, evaluated = ({s for e, s in h.events if e == kind} for kind in ("start", "forget", "evaluate"))
    if not ahead:
        assert not started and not forgotten
        return
    ahead = started & evaluated
    assert len(ahead) >= evaluated_rows.height // 3, "most attempts should take a proposal compiled ahead"
    for s in ahead:  # its compile was started (and not forgotten since) before the evaluation asked for it
        mine = [e for e, x in h.events if x == s]
        assert mine[mine.index("evaluate") - 1] == "start"  # (a stale would-be commit is evaluated again)
    # the head moved on (commits): what was drawn from the older head was forgotten, never evaluated after
    assert df.filter(pl.col("committed") & (pl.col("step") > 0)).height >= 1 and forgotten
    for s in forgotten & evaluated:
        mine = [e for e, x in h.events if x == s]
        assert mine.index("forget") > mine.index("evaluate") or mine[mine.index("evaluate") - 1] == "start"


def test_agent_ahead_0_draws_nothing_ahead(cfg_factory, tmp_path):
    h = AheadHarness()
    search(cfg_factory, tmp_path, h, None, "search.max_steps=4", "agent.ahead=0")
    assert not [e for e, _ in h.events if e != "evaluate"]


class StopsWhileDrawingAhead:
    """The mutation operator, interrupted (Ctrl-C) on its `n`-th proposal. Test double only."""

    def __init__(self, op, n):
        self.op, self.n, self.calls = op, n, 0
        self.name, self.model, self.ahead = op.name, op.model, op.ahead

    def propose(self, ctx):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.op.propose(ctx)

    def redirect(self, ctx, reason):
        return self.op.redirect(ctx, reason)

    def close(self):
        pass


def test_a_stop_while_drawing_ahead_records_the_attempt_in_flight(cfg_factory, tmp_path):
    cfg = cfg_factory("harness=compile", f"seed={SEED}", "agent.ahead=2", run_dir=tmp_path)
    op = StopsWhileDrawingAhead(make_operators(cfg.agent, tmp_path, problem_from_cfg(cfg.kernel), 1)[0], 5)
    with pytest.raises(KeyboardInterrupt):
        search(cfg_factory, tmp_path, AheadHarness(), [op], "search.max_steps=6", "agent.ahead=2")
    df = lineage.read_run(tmp_path).filter(pl.col("step") > 0)
    assert df["decision"].to_list()[-1] == "interrupted" and df.height >= 2
