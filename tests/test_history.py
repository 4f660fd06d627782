"""The best version is the lineage's head (avo.history), for everything that names it.

The H200 run of 2026-12-02 committed v1 as a paired gain over v0 (x1.0059 [1.0010, 1.0109]) that avo.bench
confirmed, but v1's own evaluation measured 649.7 TFLOPS against the seed's 655.9 (the clocks ran lower):
anything that ranked versions by stored score called v0 the best. Here that lineage is written with the real
writer and every consumer is asked."""
from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from avo import history, lineage
from avo.problem import problem_from_cfg
from avo.schema import attempt_row
from avo.types import ConfigResult, Decision, EvalResult, Proposal, Status, Version
from tests.conftest import ROOT, make_cfg

NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
T0 = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)
OP = SimpleNamespace(name="mutation", model="")


def _row(run_dir, problem, step, attempt, source, decision, score, parent=None, version=None, ratio=None, island=0,
         minutes=1.0):
    r = ratio or (None, None, None)
    result = EvalResult(Status.OK, ranked=True, score=score, stage="bench", gpu="NVIDIA H200",
                        configs=[ConfigResult("full_b8_s4096_h16-16_d128", tflops=score, cudnn_tflops=676.9,
                                              fa2_tflops=354.3, ratio=r[0], ratio_lo=r[1], ratio_hi=r[2])],
                        paired_ratio=r[0], paired_lo=r[1], paired_hi=r[2],
                        incumbent_score=parent.score * 1.001 if parent else None)
    row = attempt_row(run_id="h200", step=step, attempt=attempt, parent=parent, version=version, decision=decision,
                      result=result, proposal=Proposal(source, message=f"{decision} at {step}.{attempt}"),
                      operator=OP, problem=problem, directive=None, started=T0 + timedelta(minutes=step),
                      propose_s=0.0, source_sha=lineage.write_source(run_dir, source), island=island)
    row["finished_at"] = row["started_at"] + timedelta(minutes=minutes)
    lineage.append(run_dir, row)
    return Version(version, row["candidate_id"], source, score, []) if version is not None else None


@pytest.fixture
def h200(tmp_path) -> Path:
    """v0 (655.9 TFLOPS in its own evaluation), a rejected candidate, v1 (649.7 in its own, x1.0059 over v0
    timed side by side)."""
    run = tmp_path / "run"
    problem = problem_from_cfg(make_cfg().kernel)
    lineage.write_run_info(run, {"run_id": "h200", "kernel": "mha", "heads_q": 16, "heads_kv": 16, "head_dim": 128,
                                 "group": 1, "agent": "mutation", "harness": "gpu", "overrides": [],
                                 "started_at": T0.isoformat()})
    v0 = _row(run, problem, 0, 0, NAIVE, "seed", 655.9, version=0)
    _row(run, problem, 1, 0, NAIVE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 2"), "not_faster", 652.0, v0,
         ratio=(0.9941, 0.9890, 0.9990))
    _row(run, problem, 1, 1, NAIVE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8"), "committed", 649.7, v0, version=1,
         ratio=(1.0059, 1.0010, 1.0109))
    return run


def test_the_head_is_the_best_though_its_stored_score_is_below_its_parents(h200):
    best = history.best(lineage.read_run(h200)).row(0, named=True)
    assert best["version"] == 1 and best["score"] < 655.9
    assert best["chain_ratio"] == pytest.approx(1.0059) and best["chain_lo"] > 1.0


def test_seed_equals_run_and_avo_bench_resolve_to_the_head(h200):
    from avo import bench
    from avo.seeds import resolve

    seed = resolve(str(h200))
    assert (seed.version, seed.origin) == (1, f"{h200}:v1") and "ROWS_PER_BLOCK 8" in seed.source
    timed = bench.seeds(bench.compose([f"seeds=[{h200},{h200}:0]", "harness=compile"]))
    assert {n: s.version for n, s in timed.items()} == {"run:v1": 1, "run:v0": 0}
    assert bench.origins(timed)["run:v1"] == {"run_dir": str(h200.resolve()), "version": 1}


def test_avo_export_exports_the_head_with_what_the_lineage_proved(h200, tmp_path):
    from avo.export import export

    meta = json.loads((export(str(h200), tmp_path / "pkg", log=lambda s: None) / "avo_export.json").read_text())
    assert meta["origin"]["version"] == 1 and meta["origin"]["score_tflops"] == 649.7
    assert meta["origin"]["over_v0"] == pytest.approx([1.0059, 1.0010, 1.0109])
    assert "ROWS_PER_BLOCK 8" in (tmp_path / "pkg" / "kernel.cu").read_text()


def test_avo_analyze_reports_the_head_and_draws_it_above_v0(h200, tmp_path, capsys):
    from avo.analysis import load, tables
    from avo.analyze import main

    lin = load([h200])
    r = tables.runs_summary(lin).row(0, named=True)
    assert (r["best_version"], r["best_score"], r["x_v0"]) == (1, 649.7, pytest.approx(1.0059))
    c = tables.commits(lin).collect()
    assert c["x_v0"].to_list() == pytest.approx([1.0, 1.0059])  # the trajectory's geomean panel: v1 above v0
    assert main([str(h200), "--out", str(tmp_path / "out")]) == 0
    assert "best   v1: x1.0059 [1.0010, 1.0109] over v0" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "best v1: x1.0059 [1.0010, 1.0109] over v0" in report
    assert (tmp_path / "out" / "plots" / "h200" / "trajectory.png").exists()


def test_the_report_reads_in_versions_timed_together_by_avo_bench(h200, tmp_path):
    """Absolute TFLOPS of several versions come from one run that timed them side by side."""
    from avo.analysis import load, report

    results = {name: EvalResult(Status.OK, ranked=True, score=s, configs=[
        ConfigResult("full_b8_s4096_h16-16_d128", tflops=s, cudnn_tflops=676.9, fa2_tflops=354.3)]).to_dict()
               for name, s in (("run:v0", 651.3), ("run:v1", 656.9))}
    (tmp_path / "rebench").mkdir()
    (tmp_path / "rebench" / "bench.json").write_text(json.dumps({"meta": {"origins": {
        "run:v0": {"run_dir": str(h200), "version": 0}, "run:v1": {"run_dir": str(h200), "version": 1}}},
        "results": results}))
    text = report.write(load([h200]), tmp_path / "out", "md", log=lambda m: None,
                        bench=[tmp_path / "rebench"]).read_text()
    section = text.split("### Versions timed side by side (avo.bench)", 1)[1]
    assert re.search(r"\| 1 \| 656\.9 \| 656\.9 \| 1\.0086 \|", section), section[:400]
    assert (tmp_path / "out" / "plots" / "h200" / "rebench.png").exists()


def test_the_progress_line_and_the_lineage_tool_show_the_head_not_a_stored_score(h200):
    import io

    from avo.agent.tools import lineage_text
    from avo.progress import Progress
    from avo.state import LineageState

    st = LineageState(h200)
    head = st.head(0)
    assert (head.version, head.chain_ratio) == (1, pytest.approx(1.0059)) and st.best() is head
    out = io.StringIO()
    Progress("h200", True, stream=out).attempt(st.rows.row(-1, named=True), head, 60.0)
    assert "| best v1 x1.0059 |" in out.getvalue()
    text = lineage_text(SimpleNamespace(history=st.chain(0), failures=[]))
    assert text.splitlines()[-1].startswith("v1: x1.0059 over its parent, x1.0059 over v0")
    assert "the last, the head, is the best" in text


def test_transfer_lessons_give_the_paired_ratio_not_a_score_difference(h200):
    from avo.transfer import lessons_markdown

    _, text = lessons_markdown(h200)
    assert "Speed: x1.0059 [1.0010, 1.0109] over v0 side by side" in text and "%" not in text


def test_a_chain_multiplies_ratios_and_combines_their_bounds_on_the_log_scale():
    seed = history.link(None, {"decision": "seed"})
    a = history.link(seed, {"decision": "committed", "paired_ratio": 1.02, "paired_lo": 1.01, "paired_hi": 1.03})
    b = history.link(a, {"decision": "committed", "paired_ratio": 1.05, "paired_lo": 1.03, "paired_hi": 1.07})
    down, up = math.hypot(math.log(1.02 / 1.01), math.log(1.05 / 1.03)), math.hypot(math.log(1.03 / 1.02),
                                                                                    math.log(1.07 / 1.05))
    assert seed == (1.0, 1.0, 1.0) and b[0] == pytest.approx(1.02 * 1.05)
    assert (b[1], b[2]) == pytest.approx((1.071 * math.exp(-down), 1.071 * math.exp(up)))
    assert a == pytest.approx((1.02, 1.01, 1.03))  # one factor: its own interval
    assert history.link(a, {"decision": "committed", "paired_ratio": None, "paired_lo": None, "paired_hi": None}) \
        is None  # an untimed factor proves nothing
    old_copy = {"decision": Decision.MIGRATED.value, "paired_ratio": None, "paired_lo": None, "paired_hi": None}
    assert history.link(a, old_copy) == a  # a migrant of schema 5 copied its parent


def test_with_islands_the_best_is_the_highest_chain_and_a_migrant_stands_for_its_original(tmp_path):
    run = tmp_path / "run"
    problem = problem_from_cfg(make_cfg().kernel)
    v0 = _row(run, problem, 0, 0, NAIVE, "seed", 600.0, version=0)
    a = NAIVE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8")
    b = NAIVE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 2")
    v1 = _row(run, problem, 1, 0, a, "committed", 590.0, v0, version=1, ratio=(1.03, 1.02, 1.04), island=0)
    _row(run, problem, 2, 0, b, "committed", 640.0, v0, version=2, ratio=(1.01, 1.005, 1.015), island=1)
    c = history.chains(lineage.read_run(run))
    assert c.filter(pl.col("head"))["version"].to_list() == [1, 2]
    assert c.filter(pl.col("best"))["version"].to_list() == [1]  # x1.03 over v0 beats x1.01, whatever the scores
    # a migration copies v1 into island 1, timed beside its head: both heads are the same kernel, v1 stands for both
    _row(run, problem, 4, 1, a, Decision.MIGRATED.value, 580.0, Version(2, "00002.00", b, 640.0, []), version=3,
         ratio=(1.02, 1.01, 1.03), island=1)
    c = history.chains(lineage.read_run(run))
    assert c.filter(pl.col("head"))["version"].to_list() == [1, 3]
    assert c.filter(pl.col("best"))["version"].to_list() == [1]
    assert c.filter(pl.col("version") == 3)["chain_ratio"][0] == pytest.approx(1.01 * 1.02)
    assert v1.version == 1
