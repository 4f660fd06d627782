"""Transfer: seeding new lineages from another run's committed version (real CLI, real NVRTC)."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from avo import lineage, search
from avo.transfer import lessons_markdown
from avo.types import Proposal

ROOT = Path(__file__).resolve().parents[1]
NAIVE = (ROOT / "kernels_cuda" / "naive" / "naive.cu").read_text()
D128_ONLY = NAIVE + '\nstatic_assert(AVO_HEAD_DIM == 128, "this kernel hard-codes head_dim 128");\n'


def launch(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "avo.launch", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def mha_run(tmp_path_factory):
    """An MHA run on CPU with agent notes, as an LLM agent would leave them."""
    tmp = tmp_path_factory.mktemp("mha")
    seed = tmp / "d128_only.cu"
    seed.write_text(D128_ONLY)
    launch("harness=compile", f"seed={seed}", "search.max_steps=2", f"harness.cache_dir={tmp / 'cubin'}",
           f"hydra.run.dir={tmp / 'run'}")
    (tmp / "run" / "agent").mkdir(exist_ok=True)
    (tmp / "run" / "agent" / "notes.md").write_text("# Notes\nTwo-stage K/V pipelines spill at 255 registers.\n")
    return tmp / "run"


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


def test_sweep_over_groups_from_one_mha_run(mha_run, tmp_path):
    r = launch("-m", "kernel=gqa", "group=4,8", f"seed={mha_run}", "harness=compile", "agent=mutation",
               "search.max_steps=1", f"harness.cache_dir={tmp_path / 'cubin'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    runs = {json.loads(p.read_text())["group"]: p.parent for p in (tmp_path / "sweep").rglob("run.json")}
    assert set(runs) == {4, 8}, r.stdout
    src_id = _run_id(mha_run)
    for group, run_dir in runs.items():
        info = json.loads((run_dir / "run.json").read_text())
        assert info["kernel"] == "gqa" and info["heads_kv"] == 32 // group and info["seed"] == str(mha_run)
        x0 = lineage.read_run(run_dir).filter(pl.col("step") == 0).row(0, named=True)
        assert x0["message"] == f"seed {mha_run}:v0" and x0["decision"] == "seed" and x0["version"] == 0
        assert x0["heads_kv"] == 32 // group and x0["status"] == "ok"  # re-verified (compiled) on the new variant
        assert json.loads(x0["extra"])["transfer"] == {"run_dir": str(mha_run.resolve()), "run_id": src_id,
                                                      "version": 0, "kernel": "mha", "group": 1}
        assert x0["source_sha"] == lineage.read_run(mha_run).filter(pl.col("version") == 0)["source_sha"][0]
        assert (run_dir / "agent" / "notes.md").read_text() == (mha_run / "agent" / "notes.md").read_text()
        lessons = (run_dir / "agent" / f"lessons_from_{src_id}.md").read_text()
        assert f"## {src_id} v0: seed " in lessons and "Registers" in lessons
        assert lineage.read_run(run_dir)["step"].max() == 1


def test_a_transferred_seed_that_fails_here_is_adapted_first(mha_run, tmp_path):
    """d=64 breaks the source's static_assert: the search goes on, the failure in view of the operator."""
    run_dir = tmp_path / "run"
    r = launch("kernel=gqa", "group=4", "kernel.head_dim=64", f"seed={mha_run}:v0", "harness=compile",
               "search.max_steps=2", "search.attempts_per_step=1", f"harness.cache_dir={tmp_path / 'cubin'}",
               f"hydra.run.dir={run_dir}")
    assert "fails on gqa (compile_error); adapting it comes first" in r.stdout
    df = lineage.read_run(run_dir)
    x0 = df.row(0, named=True)
    assert (x0["step"], x0["decision"], x0["status"], x0["committed"]) == (0, "failed", "compile_error", False)
    assert x0["message"] == f"seed {mha_run}:v0" and "head_dim 128" in x0["error"] + json.loads(x0["extra"])["log_tail"]
    later = df.filter(pl.col("step") > 0)
    assert later["step"].to_list() == [1, 2] and set(later["parent_id"]) == {x0["candidate_id"]}
    assert not df["committed"].any()
    # resuming keeps adapting: no second evaluation of the seed
    launch("kernel=gqa", "group=4", "kernel.head_dim=64", f"seed={mha_run}:v0", "harness=compile",
           "search.max_steps=3", "search.attempts_per_step=1", f"harness.cache_dir={tmp_path / 'cubin'}",
           f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'ignored'}")
    df = lineage.read_run(run_dir)
    assert df["step"].to_list() == [0, 1, 2, 3] and df["candidate_id"].is_unique().all()


class AdaptingOperator:
    """Stands in for the LLM only to drive the search: returns a d=64-capable source, records what it saw."""
    name, model = "adapting", ""

    def __init__(self):
        self.seen = []

    def propose(self, ctx):
        self.seen.append((ctx.best, list(ctx.failures), list(ctx.history)))
        return Proposal(NAIVE if not ctx.history else NAIVE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8"),
                        message="drop the d128-only assertion")

    def redirect(self, ctx, reason):
        return None

    def close(self):
        pass


def test_the_first_correct_candidate_becomes_v0(mha_run, tmp_path, monkeypatch, cfg_factory):
    op = AdaptingOperator()
    monkeypatch.setattr(search, "make_operators", lambda *a, **kw: [op])
    cfg = cfg_factory("kernel=gqa", "group=8", "kernel.head_dim=64", f"seed={mha_run}", "harness=compile",
                      "search.max_steps=2", "search.attempts_per_step=1", f"harness.cache_dir={tmp_path / 'cubin'}",
                      run_dir=tmp_path / "run")
    summary = search.run_search(cfg)
    best, failures, history = op.seen[0]
    assert best.score is None and best.source == D128_ONLY and history == []
    assert failures[0].status.value == "compile_error" and failures[0].message.startswith("seed ")
    df = lineage.read_run(tmp_path / "run")
    v0 = df.filter(pl.col("version") == 0).row(0, named=True)
    assert (v0["step"], v0["decision"], v0["parent_id"]) == (1, "seed", "00000.00")
    assert op.seen[1][0].candidate_id == v0["candidate_id"] and op.seen[1][1] == []  # adapted: improve from v0
    assert summary.best_version == 0 and summary.commits == 0


def test_lessons_list_every_committed_version_with_its_gain(mha_run, tmp_path):
    v0 = lineage.read_run(mha_run).filter(pl.col("version") == 0).row(0, named=True)
    now = datetime.now(timezone.utc)
    rows = [{**v0, "ranked": True, "score": 100.0},  # v1's own score is below v0's: another evaluation
            {**v0, "step": 5, "candidate_id": "00005.00", "version": 1, "decision": "committed", "score": 99.0,
             "parent_id": v0["candidate_id"], "paired_ratio": 1.01, "paired_lo": 1.004, "paired_hi": 1.016,
             "message": "pipeline K and V loads\nTwo stages, 64-row tiles.", "started_at": now, "finished_at": now,
             "configs": [{"key": "causal_b1_s32768_h16-16_d128", "tflops": 110.0, "ms": 1.0, "ms_p10": 1.0,
                          "ms_p90": 1.0, "cudnn_tflops": 400.0, "fa2_tflops": 200.0, "max_err": 0.0}]}]
    out = tmp_path / "copy"
    for r in rows:
        lineage.append(out, r)
    run_id, text = lessons_markdown(out)
    assert run_id == v0["run_id"]
    assert "## " + run_id + " v1: pipeline K and V loads" in text
    assert "Speed: x1.0100 [1.0040, 1.0160] over v0 side by side" in text and "%" not in text
    assert "Score: 99.0 TFLOPS in its own evaluation" in text
    assert "causal_b1_s32768_h16-16_d128 110.0 (cuDNN 400.0)" in text and "Two stages, 64-row tiles." in text


def test_the_compiler_is_recorded_and_a_seed_built_by_another_is_named(mha_run, tmp_path):
    """Every attempt records what built it (extra.compiler); a seed whose run was compiled by another NVRTC
    (a GPU node's, checked here on a CPU checkout) gets one line saying so, and the run goes on."""
    from avo.harness.nvrtc import compiler

    here = compiler()
    assert here.startswith("nvrtc 13.")
    rows = lineage.read_run(mha_run)
    assert set(rows["extra"].str.json_path_match("$.compiler").drop_nulls()) == {here}
    other = tmp_path / "gpu-run"
    (other / "lineage").mkdir(parents=True)
    (other / "run.json").write_bytes((mha_run / "run.json").read_bytes())
    for f in (mha_run / "lineage").rglob("*"):
        if f.suffix == ".cu":
            dst = other / f.relative_to(mha_run)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    for row in rows.with_columns(pl.col("extra").str.replace(here, "nvrtc 12.4", literal=True)).to_dicts():
        lineage.append(other, row)
    quiet = launch("harness=compile", f"seed={mha_run}", "search.max_steps=0", f"hydra.run.dir={tmp_path / 'same'}")
    assert "compiled with" not in quiet.stdout
    r = launch("harness=compile", f"seed={other}", "search.max_steps=0", f"hydra.run.dir={tmp_path / 'new'}")
    assert f"compiled with nvrtc 12.4 and this harness with {here}" in r.stdout, r.stdout
    x0 = lineage.read_run(tmp_path / "new").row(0, named=True)
    assert x0["status"] == "ok" and json.loads(x0["extra"])["compiler"] == here
