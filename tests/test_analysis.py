"""Analysis tables, plots, report and CLI on lineages written with avo.lineage's own writer."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avo import lineage
from avo.analysis import AnalysisError, load, tables
from avo.types import OUTCOMES

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
KEYS = ("full_b4_s4096_h32-8_d128", "causal_b4_s4096_h32-8_d128")
# (step, attempt, status, decision, score): the scripted history of one run, one minute per attempt.
HISTORY = [
    (0, 0, "ok", "seed", 100.0),
    (1, 0, "compile_error", "failed", None), (1, 1, "ok", "not_faster", 90.0), (1, 2, "ok", "committed", 120.0),
    (2, 0, "incorrect", "failed", None), (2, 1, "timeout", "failed", None), (2, 2, "crashed", "failed", None),
    (3, 0, "invalid", "invalid", None), (3, 1, "ok", "committed", 150.0),
    (4, 0, "ok", "regression", 160.0),
]


def write_run(run_dir: Path, run_id: str, overrides: list[str], scale: float = 1.0,
              history=HISTORY, fields: dict[str, dict] | None = None) -> None:
    """A run through the real writer: sources, attempts (compacted when enough), run.json, supervisor.
    fields: candidate id -> further columns of its row."""
    lineage.write_run_info(run_dir, {"run_id": run_id, "kernel": "gqa", "group": 4, "agent": "mutation",
                                     "operator": "mutation", "model": "", "seed": "naive",
                                     "overrides": overrides, "started_at": T0.isoformat()})
    version, parent, parent_score = 0, None, None
    for i, (step, attempt, status, decision, score) in enumerate(history):
        committed = decision in ("seed", "committed")
        score = score * scale if score else None
        source = f"// version of step {step} attempt {attempt}\n__global__ void k() {{ int x = {i}; }}\n"
        cid = f"{step:05d}.{attempt:02d}"
        configs = [{"key": k, "tflops": score * (0.9 + 0.2 * j) if score else None, "ms": 1.0, "ms_p10": 0.9,
                    "ms_p90": 1.1, "cudnn_tflops": 200.0 + 100 * j, "fa2_tflops": 150.0 + 50 * j, "max_err": 1e-3}
                   for j, k in enumerate(KEYS)] if score else []
        # timed side by side with its parent: the ratio of the two scores, bounds 1 % either side
        ratio = score / parent_score if score and parent_score else None
        lineage.append(run_dir, {
            "paired_ratio": ratio, "paired_lo": ratio and ratio * 0.99, "paired_hi": ratio and ratio * 1.01,
            "run_id": run_id, "step": step, "attempt": attempt, "candidate_id": cid, "parent_id": parent,
            "version": (version if decision == "seed" else version + 1) if committed else None,
            "committed": committed, "decision": decision, "status": status, "ranked": True, "score": score,
            "best_before": None, "configs": configs, "source_sha": lineage.write_source(run_dir, source),
            "operator": "mutation", "model": "", "message": f"change {i}", "error": "",
            "prompt_tokens": 0 if step == 0 else 1000, "completion_tokens": 0 if step == 0 else 200,
            "llm_calls": 0 if step == 0 else 1, "kernel": "gqa", "heads_q": 32, "heads_kv": 8, "head_dim": 128,
            "group": 4, "started_at": T0 + timedelta(minutes=i), "finished_at": T0 + timedelta(minutes=i + 1),
            **(fields or {}).get(cid, {})})
        if committed:
            version = version if decision == "seed" else version + 1
            parent, parent_score = cid, score
    lineage.append_supervisor(run_dir, {"run_id": run_id, "step": 2, "reason": "3 consecutive failures",
                                        "directive": "try a smaller tile", "operator": "mutation"})


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    write_run(root / "0", "r0", ["agent=mutation", "group=4", "run_dir=/x", "rng=0"], 1.0)
    write_run(root / "1", "r1", ["agent=mutation", "group=8", "run_dir=/y", "rng=1"], 2.0)
    lineage.compact(root / "1")  # one run compacted, one not: both layouts read alike
    return root


def one(df: pl.DataFrame, run_id: str) -> dict:
    return df.filter(pl.col("run_id") == run_id).row(0, named=True)


def test_run_summary_counts_the_taxonomy_and_the_best_version(sweep):
    runs = tables.runs_summary(load(sweep))
    r = one(runs, "r0")
    assert (r["steps"], r["attempts"], r["commits"]) == (4, 9, 2)
    assert r["acceptance"] == pytest.approx(2 / 9)
    assert {k: r[k] for k in OUTCOMES if r[k]} == {
        "committed": 2, "not_faster": 1, "regression": 1, "compile_error": 1, "incorrect": 1, "crashed": 1,
        "timeout": 1, "invalid": 1}
    assert sum(r[k] for k in OUTCOMES) == r["attempts"]
    assert (r["best_version"], r["best_score"], r["seed_score"]) == (2, 150.0, 100.0)
    # x_v0: the chain of the two commits' paired ratios (1.2, 1.25), each bound's distance adding on the log scale
    down, up = math.sqrt(2) * math.log(1 / 0.99), math.sqrt(2) * math.log(1.01)
    assert (r["x_v0"], r["x_v0_lo"], r["x_v0_hi"]) == pytest.approx((1.5, 1.5 * math.exp(-down), 1.5 * math.exp(up)))
    # the regression (160) is faster on average but was never committed, so it is not the best
    assert r["vs_cudnn"] == pytest.approx(150.0 / (200.0 * 300.0) ** 0.5)
    assert r["vs_fa2"] == pytest.approx(150.0 / (150.0 * 200.0) ** 0.5)
    assert r["best_hours"] == pytest.approx(9 / 60) and r["hours"] == pytest.approx(10 / 60)
    assert (r["best_tokens"], r["tokens"], r["interventions"]) == (8 * 1200, 9 * 1200, 1)
    assert one(runs, "r1")["best_score"] == 300.0
    assert set(runs["group"]) == {"4", "8"} and runs["agent"].to_list() == ["mutation"] * 2


def test_commits_carry_the_attempts_hours_and_tokens_spent_to_reach_them(sweep):
    c = tables.commits(load(sweep)).filter(pl.col("run_id") == "r0").collect()
    assert c["version"].to_list() == [0, 1, 2]
    assert c["n"].to_list() == [0, 3, 8]
    assert c["hours"].to_list() == pytest.approx([1 / 60, 4 / 60, 9 / 60])
    assert c["cum_tokens"].to_list() == [0, 3 * 1200, 8 * 1200]
    assert c["x_parent"].to_list()[1:] == pytest.approx([1.2, 1.25]) and c["x_parent"][0] is None
    assert c["x_v0"].to_list() == pytest.approx([1.0, 1.2, 1.5]) and c["best"].to_list() == [False, False, True]
    assert c["message"].to_list() == ["change 0", "change 3", "change 8"]


def test_best_configs_compare_each_config_with_the_baselines(sweep):
    b = tables.best_configs(load(sweep)).filter(pl.col("run_id") == "r1").collect()
    assert b["key"].to_list() == list(KEYS)
    assert b["tflops"].to_list() == pytest.approx([270.0, 330.0])
    assert b["vs_cudnn"].to_list() == pytest.approx([1.35, 1.1])
    assert b["vs_fa2"].to_list() == pytest.approx([1.8, 1.65])


def test_sweep_groups_by_the_overrides_that_vary(sweep):
    lin = load(sweep)
    assert lin.sweep_keys == ["group"]  # agent is the same everywhere, run_dir and rng say nothing
    s = tables.sweep_summary(lin)
    assert s["group"].to_list() == ["4", "8"] and s["runs"].to_list() == [1, 1]
    assert s["best_mean"].to_list() == [150.0, 300.0] and s["acceptance"].to_list() == pytest.approx([2 / 9] * 2)
    assert s["x_v0_mean"].to_list() == pytest.approx([1.5, 1.5])
    both = tables.sweep_summary(lin, ["agent"])
    assert both["runs"].to_list() == [2] and both["compile_error"].to_list() == [2]
    assert both["best_mean"].to_list() == [225.0]


def test_a_corrupt_part_file_is_reported_and_the_rest_still_counts(sweep):
    bad = sweep / "0" / "lineage" / "part-s00099-a00.parquet"
    bad.write_bytes(b"PAR1 truncated")
    warnings = []
    r = one(tables.runs_summary(load(sweep, warn=warnings.append)), "r0")
    assert any(str(bad) in w and "unreadable" in w for w in warnings)
    assert (r["attempts"], r["commits"], r["best_score"]) == (9, 2, 150.0)


def test_files_of_another_schema_version_are_read_with_a_warning(sweep):
    """A file from before a column existed, one with a column this reader does not know, one retyped."""
    run = sweep / "0"
    part = sorted((run / "lineage").glob("part-*.parquet"))
    old = pq.read_table(part[1]).drop_columns(["power_w", "extra"])
    pq.write_table(old, part[1])
    new = pq.read_table(part[2])
    pq.write_table(new.append_column("l2_hit_rate", pa.array([0.5])), part[2])
    retyped = pq.read_table(part[3])
    pq.write_table(retyped.set_column(retyped.schema.get_field_index("step"), "step",
                                      retyped["step"].cast(pa.int64())), part[3])
    warnings = []
    lin = load(sweep, warn=warnings.append)
    r = one(tables.runs_summary(lin), "r0")
    assert (r["attempts"], r["commits"], r["compile_error"], r["best_score"]) == (9, 2, 1, 150.0)
    text = "\n".join(warnings)
    assert "missing power_w, extra" in text and "extra l2_hit_rate" in text and "other types for step" in text
    a = lin.attempts.filter(pl.col("run_id") == "r0").collect()
    assert a["power_w"].null_count() == 10 and a["step"].dtype == pl.Int32 and len(a) == 10


def test_a_run_without_run_json_takes_its_id_from_the_lineage(sweep):
    (sweep / "1" / "run.json").unlink()
    warnings = []
    lin = load(sweep, warn=warnings.append)
    assert any("no readable run.json" in w for w in warnings)
    assert set(lin.runs["run_id"]) == {"r0", "r1"}
    assert one(tables.runs_summary(lin), "r1")["best_score"] == 300.0


def test_no_lineage_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no lineage found"):
        load([tmp_path / "empty", tmp_path / "missing"], warn=lambda m: None)
    p = subprocess.run([sys.executable, "-m", "avo.analyze", str(tmp_path / "empty")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "holds no lineage" in p.stderr and "no lineage found" in p.stderr


def test_markdown_report_has_figures_diff_messages_and_interventions(sweep, tmp_path):
    from avo.analysis import report

    path = report.write(load(sweep), tmp_path / "out", "md", log=lambda m: None)
    text = path.read_text()
    assert "+__global__ void k() { int x = 8; }" in text and "-__global__ void k() { int x = 0; }" in text
    # v2 over v1 side by side [bounds], their chain over v0 [bounds], its own score: no score-to-score "gain"
    assert "| 2 |  | 3 | 1 | committed | 1.25 | 1.2375 | 1.2625 | 1.5 | 1.4788 | 1.5213 | 150.0 | 8 | 0.15 | 9600 |" \
        " change 8 |" in text
    assert "try a smaller tile" in text and "3 consecutive failures" in text
    pngs = sorted((tmp_path / "out" / "plots").rglob("*.png"))
    assert len(pngs) == 9  # four per run and the sweep comparison
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.relative_to(tmp_path / 'out')})" in text
    runs = pl.read_csv(tmp_path / "out" / "runs.csv")
    assert runs.sort("run_id")["best_score"].to_list() == [150.0, 300.0]


def test_cli_html_report_is_self_contained(sweep, tmp_path):
    out = tmp_path / "html"
    p = subprocess.run([sys.executable, "-m", "avo.analyze", str(sweep), "--out", str(out), "--format", "html"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 run(s), 18 attempts" in p.stdout
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 9 and "src=\"plots/" not in text
    assert "x = 8; }" in text and "change 8" in text


def _analyze(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avo.analyze", *map(str, args), "--no-plots"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": str(columns)})


def _summary(stdout: str) -> list[str]:
    """The summary avo.analyze prints between its first line and the list of files it wrote."""
    lines = stdout.splitlines()
    return lines[1:next(i for i, ln in enumerate(lines) if ln.startswith("tables: "))]


@pytest.mark.parametrize("columns", [80, 120])
def test_cli_prints_a_summary_that_fits_the_terminal_and_leaves_wide_tables_to_files(sweep, tmp_path, columns):
    p = _analyze(sweep, "--out", tmp_path / "out", columns=columns)
    assert p.returncode == 0, p.stderr
    summary = _summary(p.stdout)
    assert all(len(ln) <= columns for ln in summary), summary
    assert summary[0].split() == ["run", "best", "x", "v0", "its", "TFLOPS", "x", "cuDNN", "x", "FA2", "commits",
                                  "failed", "h", "to", "best"]
    assert summary[1].split() == ["group=4", "v2", "1.5000", "150.0", "0.61", "0.87", "2/9", "5", "0.15"]
    assert summary[2].split() == ["group=8", "v2", "1.5000", "300.0", "1.22", "1.73", "2/9", "5", "0.15"]
    # one cell per run: no cell table; scores of two runs are said not to compare
    assert summary[3].startswith("note: best_score of different runs comes from different evaluations")
    assert not any(ln.startswith("cell") for ln in summary)
    wide = pl.read_csv(tmp_path / "out" / "runs.csv")
    assert {"compile_error", "incorrect", "tokens", "best_tokens", "interventions"} <= set(wide.columns)


def test_cli_summary_of_one_run_and_of_replicated_cells(sweep, tmp_path):
    p = _analyze(sweep / "0", "--out", tmp_path / "one")
    assert p.returncode == 0, p.stderr
    one_run = _summary(p.stdout)
    assert one_run[0] == "run 0 (gqa, group 4, mutation)" and all(len(ln) <= 80 for ln in one_run)
    assert " ".join(one_run[1:]).split() == (
        "best v2: x1.5000 [1.4788, 1.5213] over v0 (chained side-by-side ratios); its own evaluation 150.0 TFLOPS, "
        "0.61x cuDNN, 0.87x FA2 "
        "tried 9 attempts in 4 steps: 2 committed, 1 not faster, 1 regression, 1 invalid, 1 compile, 1 incorrect, "
        "1 crashed, 1 timeout cost 0.17 h of attempts; best after 0.15 h and 9,600 tokens; "
        "supervisor redirects: 1").split()
    doubled = [(0, 0, "ok", "seed", 100.0), (1, 0, "ok", "committed", 200.0)]  # a second group=8 run, x2 over its v0
    write_run(sweep / "2", "r2", ["agent=mutation", "group=8", "run_dir=/z", "rng=2"], 4.0, history=doubled)
    cells = _summary(_analyze(sweep, "--out", tmp_path / "cells").stdout)
    cut = cells.index("")
    assert [ln.split()[:3] for ln in cells[1:cut]] == [["group=8", "v1", "2.0000"], ["group=4", "v2", "1.5000"],
                                                       ["group=8", "v2", "1.5000"]]  # the largest gain first
    assert cells[cut + 1].split()[:6] == ["cell", "runs", "x", "v0", "+-std", "max"]
    assert cells[cut + 2].split()[:5] == ["group=4", "1", "1.5000", "-", "1.5000"]
    assert cells[cut + 3].split()[:5] == ["group=8", "2", "1.7500", "0.3536", "2.0000"]


def test_cli_rejects_an_unknown_group_key(sweep):
    p = subprocess.run([sys.executable, "-m", "avo.analyze", str(sweep), "--by", "agnet", "--no-plots"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--by agnet" in p.stderr and "Traceback" not in p.stderr


def test_analysis_of_a_real_search_run(cfg_factory, tmp_path):
    """run_search with the NVRTC compile harness on CPU, then the tables agree with its summary."""
    from avo.search import run_search

    summary = run_search(cfg_factory("harness=compile", "seed=naive", "search=smoke", run_dir=tmp_path / "run"))
    r = tables.runs_summary(load(tmp_path)).row(0, named=True)
    assert r["run_id"] == summary.run_id and r["attempts"] == summary.attempts
    assert r["commits"] == summary.commits and r["kernel"] == "mha"
    assert r["unranked"] + r["invalid"] == r["attempts"] - r["commits"]


def test_rows_left_twice_by_an_interrupted_compaction_count_once(sweep):
    run = sweep / "0" / "lineage"
    parts = {p.name: p.read_bytes() for p in run.glob("part-*.parquet")}
    lineage.compact(sweep / "0")
    for name, data in list(parts.items())[:4]:  # as if the process died before deleting these parts
        (run / name).write_bytes(data)
    r = one(tables.runs_summary(load(sweep)), "r0")
    assert (r["attempts"], r["commits"], r["compile_error"]) == (9, 2, 1)


def test_runs_with_nothing_to_plot_still_get_tables_and_a_report(tmp_path):
    write_run(tmp_path / "failed_seed", "fs", ["group=4"], history=[(0, 0, "compile_error", "failed", None)])
    write_run(tmp_path / "seed_only", "so", ["group=8"], history=[(0, 0, "ok", "seed", 100.0)])
    write_run(tmp_path / "unranked", "un", ["group=2"],
              history=[(0, 0, "ok", "seed", None), (1, 0, "ok", "unranked", None), (1, 1, "ok", "committed", None)])
    from avo.analysis import report

    lin = load(tmp_path)
    runs = tables.runs_summary(lin)
    fs, so, un = one(runs, "fs"), one(runs, "so"), one(runs, "un")
    assert (fs["attempts"], fs["acceptance"], fs["best_version"], fs["best_score"]) == (0, None, None, None)
    assert (so["attempts"], so["best_version"], so["best_score"], so["x_v0"]) == (0, 0, 100.0, 1.0)
    # harness=compile: nothing is timed, so the best is the latest committed version
    assert (un["attempts"], un["commits"], un["unranked"], un["best_version"]) == (2, 1, 1, 1)
    text = report.write(lin, tmp_path / "out", "md", log=lambda m: None).read_text()
    assert "(no committed version)" in text and "(the seed is still the best version)" in text
    plots = tmp_path / "out" / "plots"
    # the seed alone is one point: no trajectory or progress axis is drawn for it, only its per-config bars
    assert sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png")) == [
        "so/configs.png", "sweep.png", "un/outcomes.png"]
    assert "Only v0 has been timed side by side so far: no trajectory to draw." in text


def test_a_file_whose_data_pages_are_damaged_is_skipped_after_the_footer_check(sweep):
    """The footer reads (so the schema check passes), but a column's pages do not decode."""
    f = sorted((sweep / "0" / "lineage").glob("part-*.parquet"))[2]  # step 1 attempt 1: not_faster
    data = bytearray(f.read_bytes())
    col = pq.read_metadata(f).row_group(0).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    f.write_bytes(bytes(data))
    warnings = []
    r = one(tables.runs_summary(load(sweep, warn=warnings.append)), "r0")
    assert any("skipping damaged lineage file" in w and str(f) in w for w in warnings)
    assert (r["attempts"], r["not_faster"], r["commits"], r["best_score"]) == (8, 0, 2, 150.0)


def test_cost_by_stage_gives_medians_per_outcome_and_the_wait_beyond_the_stages(tmp_path):
    """Screened, full and failed evaluations each get their stage medians; eval_s is the attempt's
    span (60 s) less its proposal (10 s), other_s what the stages do not account for."""
    from avo.analysis import cost

    history = [(0, 0, "ok", "seed", 100.0), (1, 0, "ok", "screened", 90.0), (1, 1, "ok", "screened", 91.0),
               (1, 2, "ok", "committed", 120.0), (2, 0, "compile_error", "failed", None)]
    clocks = ("stage", "compile_s", "verify_s", "screen_s", "bench_s")
    fields = {cid: dict(zip(clocks, v, strict=True), propose_s=10.0) for cid, v in {
        "00001.00": ("screen", 1.0, 0.5, 0.25, None), "00001.01": ("screen", 3.0, 0.5, 0.25, None),
        "00001.02": ("bench", 1.0, 0.5, 0.25, 4.0), "00002.00": (None, 1.5, None, None, None)}.items()}
    write_run(tmp_path / "r", "r1", [], history=history, fields=fields)
    t = {r["outcome"]: r for r in cost.by_stage(load([str(tmp_path / "r")])).iter_rows(named=True)}
    assert set(t) == {"screened", "full", "compile_error"}
    assert t["screened"]["n"] == 2 and t["screened"]["compile_s"] == 2.0 and t["screened"]["bench_s"] == 0
    assert t["full"]["bench_s"] == 4.0 and t["full"]["eval_s"] == 50.0
    assert t["full"]["other_s"] == 50.0 - (1.0 + 0.5 + 0.25 + 4.0)
    assert t["compile_error"]["eval_s"] == 50.0 and t["compile_error"]["compile_s"] == 1.5


def _attempts(run_dir: Path, rows: list[tuple], minutes=None) -> None:
    """A run of (step, attempt, status, decision) rows through the real writer, v0 first; minutes: (start, end)
    per row after v0, else one minute each in a row."""
    lineage.write_run_info(run_dir, {"run_id": run_dir.name, "overrides": []})
    src = lineage.write_source(run_dir, "// k\n")
    for i, (step, attempt, status, decision) in enumerate([(0, 0, "ok", "seed"), *rows]):
        start, end = (minutes[i - 1] if minutes and i else (i, i + 1))
        committed = decision in ("seed", "committed", "migrated")
        lineage.append(run_dir, {"run_id": run_dir.name, "step": step, "attempt": attempt,
                                 "candidate_id": f"{step:05d}.{attempt:02d}",
                                 "parent_id": None if i == 0 else "00000.00",
                                 "version": i if committed else None, "committed": committed, "decision": decision,
                                 "status": status, "source_sha": src, "started_at": T0 + timedelta(minutes=start),
                                 "finished_at": T0 + timedelta(minutes=end)})


def test_every_decision_and_status_has_its_column_and_the_columns_add_up(tmp_path):
    """One attempt of every outcome the enums allow, and a migration's two kinds of row (no attempts)."""
    from avo.types import FAILED_ONLY, MIGRATION, Decision, Status

    rows = [(1 + i, 0, "ok", d.value) for i, d in enumerate(d for d in Decision if d not in MIGRATION | FAILED_ONLY)]
    failed = [s for s in Status if s is not Status.OK]
    rows += [(20 + i, 0, s.value, s.value if s.value in {d.value for d in FAILED_ONLY} else "failed")
             for i, s in enumerate(failed)]
    rows += [(40, 0, "ok", "migrated"), (40, 1, "ok", "kept")]
    _attempts(tmp_path / "all", rows)
    r = one(tables.runs_summary(load([tmp_path / "all"])), "all")
    assert set(OUTCOMES) == {("adapted" if d is Decision.SEED else d.value) for d in Decision
                             if d not in MIGRATION | FAILED_ONLY} | {s.value for s in failed}
    assert {o: r[o] for o in OUTCOMES} == dict.fromkeys(OUTCOMES, 1)  # each its own column, once
    assert r["attempts"] == len(rows) - 2 == sum(r[o] for o in OUTCOMES)
    from avo.analysis import report

    shown = report.run_table(tables.runs_summary(load([tmp_path / "all"])), []).columns
    assert set(OUTCOMES) <= set(shown)


def test_the_h200_runs_outcomes_add_up_to_its_29_attempts(tmp_path):
    """docs/results/2026-12-01_h200_mha_paired_mutation/runs.csv: its outcome columns summed to 19 of 29
    attempts, because the 10 dropped at the screen had no column."""
    kinds = [("ok", "committed")] * 2 + [("ok", "not_faster")] * 9 + [("ok", "screened")] * 10 + \
        [("compile_error", "failed")] * 7 + [("timeout", "failed")]
    _attempts(tmp_path / "h200", [(1 + i, 0, s, d) for i, (s, d) in enumerate(kinds)])
    r = one(tables.runs_summary(load([tmp_path / "h200"])), "h200")
    assert r["attempts"] == 29 == sum(r[o] for o in OUTCOMES) and r["screened"] == 10


def test_hours_are_the_union_of_overlapping_attempts_as_the_budget_counts_them(tmp_path):
    """Three workers' attempts overlap: 30 attempt-minutes cover 12 minutes of wall time (sum: 0.5 h)."""
    from avo.clock import busy_seconds
    from avo.state import LineageState

    spans = [(1, 11), (1, 11), (2, 12), (20, 21)]  # after v0 (0-1); a resumed session from minute 20
    _attempts(tmp_path / "k3", [(1, 0, "ok", "not_faster"), (2, 0, "ok", "not_faster"), (3, 0, "ok", "committed"),
                                (4, 0, "ok", "not_faster")], spans)
    lin = load([tmp_path / "k3"])
    r = one(tables.runs_summary(lin), "k3")
    assert r["hours"] == pytest.approx(13 / 60) and r["best_hours"] == pytest.approx(12 / 60)
    assert tables.attempts(lin).collect()["hours"].to_list() == pytest.approx([1 / 60, 11 / 60, 11 / 60, 12 / 60,
                                                                               13 / 60])
    assert LineageState(tmp_path / "k3").spent == busy_seconds(lineage.read_run(tmp_path / "k3")) == 13 * 60
