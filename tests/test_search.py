"""The loop with a deterministic scoring double (pure logic), and end to end with the real NVRTC harness."""
import json
import subprocess
import sys

import polars as pl
import pytest

from avo import lineage
from avo.contract import tunables
from avo.operators import make_operator
from avo.problem import problem_from_cfg
from avo.search import Search, SearchError, _open_run, run_search
from avo.types import ConfigResult, EvalResult, Status
from tests.conftest import DATA, ROOT, kill_mid_run

SEED = str(DATA / "tunable.cu")


class ScoreHarness:
    """Scores a source by its tunables; fails correctness for one combination. Test double only.

    Timed "side by side" with the incumbent: both get per-iteration times from their scores."""
    name, ranks, arch, checks, profiles = "score", True, "sm_90a", True, False

    def __init__(self):
        self.calls = 0

    @staticmethod
    def score(source):
        t = {k: int(v.value) for k, v in tunables(source).items()}
        if t["STAGES"] == 3 and t["BLOCK_N"] == 128:
            return None
        return 100 + t["BLOCK_M"] / 4 + t["BLOCK_N"] / 8 + 5 * t["STAGES"] - abs(t["NUM_WARPS"] - 4)

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        self.calls += 1
        score = self.score(source)
        if score is None:
            return EvalResult(Status.INCORRECT, error="max error 3.1 > tolerance 0.02")
        times = [1e3 / score * (1 + 1e-4 * (i % 3)) for i in range(10)]
        c = ConfigResult("c", tflops=score, samples=times)
        inc = next((r for r in against or [] if r.role == "incumbent"), None)
        if inc is not None:
            c.incumbent_tflops = self.score(inc.source)
            c.incumbent_samples = [1e3 / c.incumbent_tflops * (1 + 1e-4 * ((i + 1) % 3)) for i in range(10)]
        return EvalResult(Status.OK, ranked=True, score=score, configs=[c], stage="bench")

    def close(self):
        pass


def run(cfg_factory, run_dir, *overrides, harness=None):
    cfg = cfg_factory("harness=compile", f"seed={SEED}", *overrides, run_dir=run_dir)
    problem = problem_from_cfg(cfg.kernel)
    info = _open_run(cfg, run_dir, problem)
    harness = harness or ScoreHarness()
    s = Search(cfg, run_dir, info["run_id"], problem, harness, [make_operator(cfg.agent, run_dir, problem)])
    return s.run(), harness


def test_lineage_only_commits_improvements_and_records_every_attempt(cfg_factory, tmp_path):
    summary, h = run(cfg_factory, tmp_path, "search.max_steps=12", "search.attempts_per_step=3")
    df = lineage.read_run(tmp_path)
    assert len(df) == h.calls == summary.attempts + 1  # the seed is no attempt
    commits = df.filter(pl.col("committed")).sort("version")
    assert commits["version"].to_list() == list(range(len(commits)))
    scores = commits["score"].to_list()
    assert scores == sorted(scores) and summary.best_score == scores[-1] and summary.best_version == len(commits) - 1
    assert summary.commits == len(commits) - 1 >= 1
    # every non-committed ranked candidate was below the best at the time, every failure is recorded
    rejected = df.filter(pl.col("decision") == "not_faster")
    assert (rejected["score"] <= rejected["best_before"]).all()
    assert (commits["paired_lo"].drop_nulls() > 1).all() and commits["paired_lo"].null_count() == 1  # the seed
    assert set(df["decision"]) <= {"seed", "committed", "not_faster", "failed", "invalid"}
    # parents are committed versions; sources are stored
    assert set(df["parent_id"].drop_nulls()) <= set(commits["candidate_id"])
    for sha in df["source_sha"]:
        assert lineage.read_source(tmp_path, sha)
    assert df.select(pl.struct("step", "attempt").is_unique().all()).item()


def test_resume_continues_without_loss_or_duplicates(cfg_factory, tmp_path):
    run(cfg_factory, tmp_path, "search.max_steps=4")
    before = lineage.read_run(tmp_path)
    summary, h = run(cfg_factory, tmp_path, "search.max_steps=9")
    after = lineage.read_run(tmp_path)
    assert after.head(len(before)).equals(before)
    assert after["candidate_id"].is_unique().all()
    assert after["step"].max() == 9 and h.calls == len(after) - len(before)
    assert (after["step"].filter(after["step"] == 0)).len() == 1, "the seed is evaluated once"


def test_resume_rejects_a_different_problem(cfg_factory, tmp_path):
    run(cfg_factory, tmp_path, "search.max_steps=1")
    with pytest.raises(SearchError, match="different problem"):
        run(cfg_factory, tmp_path, "search.max_steps=2", "kernel=gqa", "group=4")


def test_stagnation_calls_the_supervisor_and_can_stop(cfg_factory, tmp_path, monkeypatch):
    scans = []
    scan = lineage.scan_supervisor
    monkeypatch.setattr(lineage, "scan_supervisor", lambda *a, **kw: scans.append(1) or scan(*a, **kw))
    summary, _ = run(cfg_factory, tmp_path, "search.max_steps=200", "search.stagnation.no_commit_steps=2",
                     "search.stagnation.max_redirects=2", "search.attempts_per_step=1")
    assert len(scans) == 1  # read once when the search opens; each step's check works from memory
    sup = scan([tmp_path]).collect()
    assert len(sup) == 2 and summary.stopped.startswith("stagnated")
    assert all("widening" in d for d in sup["directive"])
    assert sup["llm_calls"].to_list() == [0, 0] and sup["model"].to_list() == ["", ""]  # no LLM: no cost
    df = lineage.read_run(tmp_path)
    assert df.filter(pl.col("step") > sup["step"][0])["directive"].str.contains("widening").all()


def test_a_corrupt_part_file_stops_the_resume_and_names_the_file(cfg_factory, tmp_path):
    run(cfg_factory, tmp_path, "search.max_steps=2")
    n = len(lineage.read_run(tmp_path))
    bad = tmp_path / "lineage" / "part-s00099-a00.parquet"
    bad.write_bytes(b"PAR1 truncated")
    with pytest.raises(lineage.LineageError, match=f"{bad} is damaged"):
        run(cfg_factory, tmp_path, "search.max_steps=3")
    assert len(lineage.scan([tmp_path], warn=lambda m: None).collect()) == n  # analysis reads what is readable


def test_compaction_keeps_every_row(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(lineage, "COMPACT_EVERY", 5)
    run(cfg_factory, tmp_path, "search.max_steps=10")
    files = list((tmp_path / "lineage").glob("*.parquet"))
    assert any(f.name.startswith("chunk-") for f in files) and len(files) < 10
    df = lineage.read_run(tmp_path)
    assert df["candidate_id"].is_unique().all() and df["step"].max() == 10


def test_end_to_end_on_cpu_with_the_nvrtc_harness(cfg_factory, tmp_path):
    cfg = cfg_factory("harness=compile", "seed=naive", "search=smoke", run_dir=tmp_path)
    summary = run_search(cfg)
    df = lineage.read_run(tmp_path)
    assert summary.attempts == len(df) - 1 >= 1
    seed = df.row(0, named=True)
    assert seed["decision"] == "seed" and seed["status"] == "ok" and seed["registers"] > 0
    assert seed["threads"] > 0 and seed["spill_bytes"] is not None and not seed["ranked"]
    assert set(df["decision"][1:]) <= {"unranked", "invalid"}
    assert json.loads((tmp_path / "run.json").read_text())["kernel"] == "mha"


def test_a_compile_error_is_recorded_with_the_compiler_message(cfg_factory, tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text((DATA / "tunable.cu").read_text().replace("p.lse[0] = 0.f;", "p.lse[0] = undefined_name;"))
    cfg = cfg_factory("harness=compile", f"seed={bad}", run_dir=tmp_path / "run")
    with pytest.raises(SearchError, match="compile_error"):
        run_search(cfg)
    row = lineage.read_run(tmp_path / "run").row(0, named=True)
    assert row["status"] == "compile_error" and "undefined_name" in json.loads(row["extra"])["log_tail"] + row["error"]


def test_killed_run_resumes_from_its_lineage(tmp_path):
    """SIGKILL the CLI mid-run, then resume: steps continue, nothing is duplicated."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "avo.launch", "harness=compile", f"seed={SEED}", "search.max_steps=40",
           f"hydra.run.dir={run_dir}"]
    kill_mid_run(cmd, run_dir, parts=4, timeout_s=120)
    before = lineage.read_run(run_dir)
    assert 4 <= len(before) < 60
    r = subprocess.run([sys.executable, "-m", "avo.launch", "harness=compile", f"seed={SEED}",
                        "search.max_steps=" + str(int(before["step"].max()) + 2), f"resume={run_dir}",
                        f"hydra.run.dir={tmp_path / 'ignored'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stdout
    after = lineage.read_run(run_dir)
    assert after.head(len(before)).equals(before)
    assert after["candidate_id"].is_unique().all() and len(after) > len(before)


class SlowHarness(ScoreHarness):
    """Every evaluation reports 100 s of benchmarking. Test double only."""

    def evaluate(self, source, problem, mode=None, against=None, deadline=None):
        r = super().evaluate(source, problem, mode, against, deadline)
        r.bench_s = 100.0
        return r


def test_no_evaluation_starts_that_cannot_finish_before_max_hours(cfg_factory, tmp_path):
    summary, h = run(cfg_factory, tmp_path, "search.max_hours=0.02", "search.max_steps=50", harness=SlowHarness())
    assert h.calls == 1 and "no time left for another evaluation" in summary.stopped
