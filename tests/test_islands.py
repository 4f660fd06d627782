"""search.islands: several lineages in one run, the best version migrating between them.

Scoring doubles rank without a GPU (pure logic); the kill/resume runs the real mutation operator and the real
NVRTC harness."""
import json
import re
import sys
import threading
import time

import polars as pl
import pytest

from avo import islands, lineage
from avo.config import ConfigError, validate
from avo.contract import set_tunables
from avo.problem import problem_from_cfg
from avo.search import Search, _open_run
from avo.stagnation import detect
from avo.types import Proposal, Redirect
from avo.workers import Workers
from tests.conftest import kill_and_resume, make_cfg
from tests.test_search import SEED, ScoreHarness
from tests.test_workers import SEED_SRC, RacingHarness, search

# better and better for ScoreHarness (the seed scores 134): 150, 155, 158
CLIMB = [set_tunables(SEED_SRC, t) for t in ({"BLOCK_M": "128"}, {"BLOCK_M": "128", "STAGES": "3"},
                                            {"BLOCK_M": "128", "BLOCK_N": "128", "STAGES": "2"})]
WORSE = set_tunables(SEED_SRC, {"NUM_WARPS": "2"})  # 132: below the seed


class Climber:
    """Proposes the first source of CLIMB that beats its best, else (slowly) WORSE; opens `gate` once handed a
    step after 4 (the first migration step in these tests). Test double only."""
    name, model = "climber", ""

    def __init__(self, gate=None):
        self.gate = gate or threading.Event()

    def propose(self, ctx):
        if ctx.step > 4:
            self.gate.set()
        better = [s for s in CLIMB if ScoreHarness.score(s) > (ctx.best.score or 0)]
        if not better:
            time.sleep(0.05)
        return Proposal(better[0] if better else WORSE, message="climb")

    def redirect(self, ctx, reason):
        return None

    def close(self):
        pass


class Laggard(Climber):
    """Proposes a source slower than the seed, the first time only once `gate` opens (the other island climbs
    first): its island moves only by migration. Test double only."""
    name = "laggard"

    def propose(self, ctx):
        assert self.gate.wait(30), "the climber never reached step 5"
        return Proposal(WORSE, message="lag")


def pair() -> list:
    """Worker 0 (island 0) climbs, worker 1 (island 1) lags."""
    gate = threading.Event()
    return [Climber(gate), Laggard(gate)]


def islands_run(cfg_factory, run_dir, ops, *overrides, harness=None):
    return search(cfg_factory, run_dir, harness or RacingHarness(), ops, f"search.workers={len(ops)}",
                  "search.attempts_per_step=1", *overrides)


def chain(df: pl.DataFrame, island: int) -> pl.DataFrame:
    """One island's lineage read from the rows: v0 and the versions committed into it."""
    return df.filter(pl.col("committed") & ((pl.col("island") == island) | (pl.col("version") == 0))).sort("version")


def assert_islands(df: pl.DataFrame, n: int) -> None:
    """Unique ids and versions; each island a chain whose every commit (a migrant too) was judged against its
    previous version; every attempt's parent is a version of its own island."""
    assert df["candidate_id"].is_unique().all()
    commits = df.filter(pl.col("committed")).sort("version")
    assert commits["version"].to_list() == list(range(len(commits)))
    for i in range(n):
        c = chain(df, i)
        assert c["parent_id"].to_list()[1:] == c["candidate_id"].to_list()[:-1], f"island {i} is not one chain"
        tried = df.filter((pl.col("island") == i) & (pl.col("step") > 0))
        assert set(tried["parent_id"]) <= set(c["candidate_id"]), f"island {i} varied another island's version"


def test_one_island_is_the_single_lineage(cfg_factory, tmp_path, capsys):
    summary = search(cfg_factory, tmp_path, RacingHarness(), None, "search.workers=2", "search.max_steps=12",
                     "search.migrate_every=2")  # islands=1: migrate_every changes nothing
    df = lineage.read_run(tmp_path)
    assert set(df["island"]) == {0} and "migrated" not in set(df["decision"])
    assert summary.commits == (df["decision"] == "committed").sum() and summary.attempts == len(df) - 1
    out = capsys.readouterr().out
    assert " w1 step" in out and " i0 " not in out and "islands' bests" not in out


def test_two_islands_keep_separate_lineages_and_bests(cfg_factory, tmp_path, capsys):
    ops = pair()
    summary = islands_run(cfg_factory, tmp_path, ops, "search.islands=2", "search.migrate_every=0",
                          "search.max_steps=8")
    df = lineage.read_run(tmp_path)
    assert_islands(df, 2)
    steps = df.filter(pl.col("step") > 0)
    assert (steps["island"] == steps["worker"] % 2).all()  # worker w works on island w mod 2
    assert chain(df, 0)["score"].to_list()[-1] == 158.0 and chain(df, 1)["version"].to_list() == [0]
    assert "migrated" not in set(df["decision"]) and summary.best_score == 158.0
    out = capsys.readouterr().out
    assert " i1 w1 step" in out and re.search(r"island 0 v3 x1\.179\d, island 1 v0 x1\.0000", out)
    assert "were not timed side by side with each other" in out  # two heads: the run's best is an estimate


def test_the_best_migrates_every_m_steps_and_the_next_candidates_are_paired_with_it(cfg_factory, tmp_path):
    islands_run(cfg_factory, tmp_path, pair(), "search.islands=2", "search.migrate_every=4",
                "search.max_steps=12")
    df = lineage.read_run(tmp_path)
    assert_islands(df, 2)
    moved = df.filter(pl.col("decision") == "migrated").sort("step")
    assert len(moved) >= 1 and set(moved["step"]) <= {4, 8} and set(moved["island"]) == {1}
    assert (moved["attempt"] == 1).all() and moved["committed"].all() and moved["operator"].to_list()[0] == "migration"
    seen = 0
    for m in moved.iter_rows(named=True):
        src = df.filter(pl.col("candidate_id") == json.loads(m["extra"])["migrated_from"]).row(0, named=True)
        assert src["island"] == 0 and src["committed"] and src["source_sha"] == m["source_sha"]
        # timed side by side with the head it replaces (its parent), and significantly faster
        assert m["parent_id"] == chain(df, 1).filter(pl.col("version") < m["version"])["candidate_id"][-1]
        assert m["paired_lo"] > 1.0 and m["score"] == src["score"] > m["best_before"]
        assert m["incumbent_score"] == pytest.approx(m["best_before"])
        # steps handed out after the migration start from the migrant and are timed side by side with it
        later = df.filter((pl.col("island") == 1) & (pl.col("step") > m["step"]) & (pl.col("step") < m["step"] + 4)
                          & (pl.col("decision") != "migrated"))
        assert (later["parent_id"] == m["candidate_id"]).all() and (later["decision"] == "not_faster").all()
        assert later["incumbent_score"].to_list() == pytest.approx([m["score"]] * len(later))
        seen += len(later)
    assert seen, "no candidate of the receiving island followed a migration"
    # no island is behind after the last migration step: island 1 holds island 0's best
    assert chain(df, 1)["source_sha"].to_list()[-1] == chain(df, 0)["source_sha"].to_list()[-1]


def _open(cfg_factory, run_dir, ops, *overrides):
    """A search opened on run_dir (its lineage read back) without running it."""
    cfg = cfg_factory("harness=compile", f"seed={SEED}", f"search.workers={len(ops)}", *overrides, run_dir=run_dir)
    problem = problem_from_cfg(cfg.kernel)
    return Search(cfg, run_dir, _open_run(cfg, run_dir, problem)["run_id"], problem, ScoreHarness(), ops)


def commit(s, island: int, step: int, source: str) -> None:
    """One attempt of an island, timed against its head and judged as the workers do."""
    chain = s.state.chain(island)
    r = s.evaluate(source, chain, chain[-1])
    row = s.record(step, 0, Proposal(source), r, s.verdict(r, chain), chain[-1], None, 0.0, worker=island,
                   island=island)
    assert row["committed"]


def test_a_migration_times_the_leading_head_beside_each_other_and_runs_once_per_island(cfg_factory, tmp_path):
    three = ("search.islands=3", "search.migrate_every=4")
    s = _open(cfg_factory, tmp_path, [Climber(), Climber(), Climber()], *three)
    s.seed()
    commit(s, 1, 1, CLIMB[0])  # island 1 at 150
    commit(s, 2, 2, CLIMB[1])  # island 2 leads at 155, island 0 is at v0 (134)
    calls = s.harness.calls
    rows = islands.migrate(s, 4, worker=1)
    assert s.harness.calls == calls + 2  # the leader timed beside each other island's head
    assert [(r["island"], r["attempt"], r["version"], r["parent_id"], r["decision"]) for r in rows] == [
        (0, 0, 3, "00000.00", "migrated"), (1, 1, 4, "00001.00", "migrated")]
    assert [json.loads(r["extra"])["migrated_from"] for r in rows] == ["00002.00"] * 2
    assert [r["best_before"] for r in rows] == [134.0, 150.0] and {r["score"] for r in rows} == {155.0}
    assert [r["paired_ratio"] for r in rows] == pytest.approx([155 / 134, 155 / 150], rel=1e-3)
    assert [s.state.head(i).candidate_id for i in range(3)] == ["00004.00", "00004.01", "00002.00"]
    head = s.state.head(1)
    assert head.gain and head.source == CLIMB[1]  # the island's new incumbent and anchor
    # each island's chain over v0 is made of its own side-by-side ratios: through the migrant for island 1
    assert head.chain_ratio == pytest.approx(150 / 134 * 155 / 150, rel=1e-3)
    commit(s, 2, 3, CLIMB[2])  # a step handed out before the migration ends after it: island 2 leads again
    assert islands.migrate(s, 4, worker=0) == []  # step 4 ran: the islands it served are not served twice
    # a migration cut short by a kill: the step last on record runs again, for the island it missed
    (tmp_path / "lineage" / "part-s00004-a01.parquet").unlink()
    again = _open(cfg_factory, tmp_path, [Climber(), Climber(), Climber()], *three)
    assert [v.candidate_id for v in again.state.chain(0)] == ["00000.00", "00004.00"]
    assert len(again.state.chain(1)) == 2
    w = Workers(again)
    assert w.next_step == 4
    assert [r["candidate_id"] for r in islands.migrate(again, 4, worker=1)] == ["00004.01"]
    assert lineage.read_run(tmp_path)["candidate_id"].is_unique().all()


class Even(ScoreHarness):
    """Times every kernel alike: no head beats another side by side. Test double only."""

    @staticmethod
    def score(source):
        return 134.0


def test_a_head_that_the_leader_does_not_beat_side_by_side_is_kept(cfg_factory, tmp_path):
    """Stored scores say the leader is faster; timed beside the island's head it is not: nothing migrates."""
    s = _open(cfg_factory, tmp_path, [Climber(), Climber()], "search.islands=2", "search.migrate_every=4")
    s.seed()
    commit(s, 1, 1, CLIMB[0])  # island 1 leads (150)
    s.harness = Even()
    rows = islands.migrate(s, 4, worker=0)
    assert [(r["island"], r["decision"], r["committed"], r["version"]) for r in rows] == [(0, "kept", False, None)]
    assert s.state.head(0).version == 0 and rows[0]["paired_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert islands.migrate(s, 4, worker=0) == []  # recorded: a resumed step does not time it again


def test_resume_brings_back_islands_bests_and_the_step_counter(cfg_factory, tmp_path):
    islands_run(cfg_factory, tmp_path, pair(), "search.islands=2", "search.migrate_every=4",
                "search.max_steps=5")
    before = lineage.read_run(tmp_path)
    bests = [chain(before, i)["candidate_id"].to_list()[-1] for i in range(2)]
    s = _open(cfg_factory, tmp_path, pair(), "search.islands=2", "search.migrate_every=4")
    assert [s.state.head(i).candidate_id for i in range(2)] == bests
    assert Workers(s).next_step == int(before["step"].max()) + 1
    islands_run(cfg_factory, tmp_path, pair(), "search.islands=2", "search.migrate_every=4",
                "search.max_steps=10")
    after = lineage.read_run(tmp_path)
    kept = after.join(before.select("candidate_id"), on="candidate_id", how="semi").sort("step", "attempt")
    assert kept.equals(before.sort("step", "attempt")), "a recorded attempt changed or went missing"
    assert_islands(after, 2)
    tried = after.filter((pl.col("step") > 0) & (pl.col("decision") != "migrated"))
    assert sorted(tried["step"]) == [s for s in range(1, 11) if s % 4], "each variation step once, none lost"
    resumed = after.filter((pl.col("island") == 1) & (pl.col("step") > before["step"].max())).sort("step")
    assert resumed["parent_id"][0] == bests[1], "island 1 resumed from another version than its best"
    with pytest.raises(Exception, match="holds 2 islands; resume it with search.islands=2"):
        _open(cfg_factory, tmp_path, [Climber()], "search.islands=1")


def test_a_killed_run_with_islands_resumes_without_loss_or_duplicates(tmp_path):
    args = [sys.executable, "-m", "avo.launch", "harness=compile", f"seed={SEED}", "search.workers=4",
            "search.islands=2", "search.migrate_every=5"]
    _, after, last, stdout = kill_and_resume(args, tmp_path)
    assert " i1 w" in stdout
    steps = after.filter(pl.col("step") > 0).group_by("step").agg(pl.col("attempt").sort().alias("a"),
                                                                  pl.col("island").n_unique().alias("n"))
    # nothing ranks here, so nothing migrates: every step but the migration steps ran its attempts once each
    assert sorted(steps["step"]) == [s for s in range(1, last + 3) if s % 5]
    assert all(a.to_list() == list(range(3)) for a in steps["a"]) and (steps["n"] == 1).all()
    assert set(after.filter(pl.col("step") > 0)["island"]) == {0, 1}


def test_analysis_shows_attempts_and_commits_per_island(cfg_factory, tmp_path, capsys):
    from avo.analysis import load, tables
    from avo.analysis import workers as crew
    from avo.analyze import main

    islands_run(cfg_factory, tmp_path / "run", pair(), "search.islands=2",
                "search.migrate_every=4", "search.max_steps=8")
    df = lineage.read_run(tmp_path / "run")
    lin = load([tmp_path / "run"])
    per = crew.per_island(lin)
    migrants = int((df["decision"] == "migrated").sum())
    rounds = int(df["decision"].is_in(["migrated", "kept"]).sum())  # a migration's rows: no attempts
    assert per["island"].to_list() == [0, 1] and per["migrants_in"].to_list() == [0, migrants]
    assert per["attempts"].sum() == len(df) - 1 - rounds and per["commits"].to_list()[1] == 0
    assert per["head_score"].to_list()[0] == 158.0 and per["x_v0"].to_list()[0] == pytest.approx(158 / 134, rel=1e-3)
    run = tables.runs_summary(lin).row(0, named=True)
    assert (run["attempts"], run["commits"]) == (len(df) - 1 - rounds, 3)
    assert run["best_version"] == chain(df, 0)["version"][-1]  # the original, not its copy in island 1
    assert crew.commits_over_time(lin)["island"].to_list() == [0] * 4  # v0 and island 0's three commits
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "migrants_in" in capsys.readouterr().out
    assert "## Islands" in (tmp_path / "out" / "report.md").read_text()
    assert pl.read_csv(tmp_path / "out" / "islands.csv")["island"].to_list() == [0, 1]


@pytest.mark.parametrize("overrides,needle", [
    (["search.islands=0"], "search.islands=0 must be between 1 and 100"),
    (["search.workers=3", "search.islands=2"], "search.workers=3 must be a multiple of search.islands=2"),
    (["search.workers=1", "search.islands=2"], "search.workers=1 must be a multiple of search.islands=2"),
    (["search.migrate_every=1"], "search.migrate_every=1 must be 0 (never) or >= 2"),
    (["search.migrate_every=-3"], "search.migrate_every=-3"),
])
def test_island_settings_are_checked_with_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("harness=compile", *overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_m_th_step_migrates_only_with_several_islands():
    cfg = make_cfg("search.islands=2", "search.workers=2", "search.migrate_every=4").search
    assert [s for s in range(13) if islands.migrates(s, cfg)] == [4, 8, 12]
    assert not any(islands.migrates(s, make_cfg("search.migrate_every=4").search) for s in range(13))
    assert [islands.island_of(w, 2) for w in range(4)] == [0, 1, 0, 1]



class Directed(Laggard):
    """The laggard, whose redirects name it; `seen`: the directions each proposal was handed. Test double only."""
    name = "directed"

    def __init__(self, gate):
        super().__init__(gate)
        self.seen = []

    def propose(self, ctx):
        self.seen.append(ctx.directive)
        return super().propose(ctx)

    def redirect(self, ctx, reason):
        return Redirect(f"laggard: leave the seed ({reason})")


def test_the_supervisor_reviews_each_island_on_its_own_and_directs_only_it(cfg_factory, tmp_path, capsys):
    """Island 0 keeps committing while island 1 never does: island 1 is redirected all the same, and
    only its workers get the directions. Before, the climbing island's commits hid the other's stall."""
    gate = threading.Event()
    climber, laggard = Climber(gate), Directed(gate)
    run = tmp_path / "run"
    islands_run(cfg_factory, run, [climber, laggard], "search.islands=2", "search.migrate_every=0",
                "search.max_steps=12", "search.stagnation.no_commit_steps=2")
    df, sup = lineage.read_run(run), lineage.scan_supervisor([run]).collect()
    assert 1 in set(sup["island"])  # the climber's own redirects give no directions
    assert all(d.startswith("laggard:") == (i == 1) for i, d in zip(sup["island"], sup["directive"], strict=True))
    stag = cfg_factory("search.stagnation.no_commit_steps=2").search.stagnation
    for r in sup.iter_rows(named=True):  # each review was justified by its own island's rows
        own = df.filter((pl.col("island") == r["island"]) & (pl.col("step") <= r["step"]))
        before = sup.filter((pl.col("island") == r["island"]) & (pl.col("step") < r["step"]))
        assert detect(own, stag, int(before["step"].max() or 0)) is not None
    assert any(d and d.startswith("laggard:") for d in laggard.seen)
    assert set(df.filter(pl.col("directive").str.starts_with("laggard:"))["island"]) == {1}
    assert " on island 1: no commit in " in capsys.readouterr().out
    from avo.analyze import main
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    section = (tmp_path / "out" / "report.md").read_text().split("Supervisor interventions", 1)[1]
    assert "| step | island | reason |" in section
    per = pl.read_csv(tmp_path / "out" / "islands.csv")
    assert per["interventions"].to_list() == [int((sup["island"] == i).sum()) for i in (0, 1)]


def test_resume_brings_back_each_island_s_latest_directions(tmp_path):
    from avo.state import LineageState

    for island, step, text in ((1, 3, "island 1: first"), (0, 4, "island 0: only"), (1, 6, "island 1: latest")):
        lineage.append_supervisor(tmp_path, {"run_id": "r", "step": step, "reason": "stall", "directive": text,
                                             "operator": "directed", "island": island})
        time.sleep(0.002)
    st = LineageState(tmp_path)
    assert (st.directive(1), st.directive(0), st.directive(2)) == ("island 1: latest", "island 0: only", None)
    assert st.directions(1) == ["island 1: first", "island 1: latest"]  # what its supervisor reads, nothing else
