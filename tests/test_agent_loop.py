"""The operator's conversation loop against the real compile harness (NVRTC, no GPU).

The model's replies are scripted: these tests check the loop's own logic (budgets, fallbacks,
feedback, records, replay), not what a model would say. tests/test_agent_vllm.py runs a real model.
"""
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from avo.agent.client import ContextOverflow, LlmError, Reply
from avo.agent.operator import LlmOperator
from avo.agent.replay import ReplayError, replay
from avo.agent.replay import main as replay_main
from avo.agent.transcript import read
from avo.config import register
from avo.harness import HarnessBench, make_harness
from avo.problem import problem_from_cfg
from avo.seeds import resolve
from avo.types import ProposalError, StepContext, Version

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def call(name, args, i=0):
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def reply(*calls, content="", finish="tool_calls"):
    msg = {"role": "assistant", "content": content, **({"tool_calls": list(calls)} if calls else {})}
    return Reply(msg, content, list(calls), finish, 100, 10, 0.01, 1)


class Scripted:
    """Returns the given replies (or raises the given exceptions) in order; records what it was sent."""

    model = "scripted"

    def __init__(self, *script):
        self.script, self.sent = list(script), []

    def chat(self, messages, tools=None, tool_choice=None, **sampling):
        self.sent.append([dict(m) for m in messages])
        item = self.script.pop(0) if self.script else reply(content="")
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture(scope="module")
def cfg():
    register()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("config", overrides=["agent=smollm", "harness=compile", "kernel.head_dim=64",
                                            "run_dir=/unused", "agent.budget.max_turns=6"])


@pytest.fixture
def setup(cfg, tmp_path):
    problem = problem_from_cfg(cfg.kernel)
    harness = make_harness(cfg.harness, tmp_path / "work")
    best = Version(0, "00000.00", resolve("naive").source, None, [], "seed")

    def make(*script, step=1, **agent):
        acfg = cfg.agent.copy()
        for k, v in agent.items():
            acfg[k] = v
        op = LlmOperator(acfg, tmp_path, Scripted(*script))
        ctx = StepContext(step, 0, best, [best], [], problem, HarnessBench(harness, problem), tmp_path,
                          random.Random(0), set())
        return op, ctx
    return make


def tunable_edit(src):
    line = next(ln for ln in src.splitlines() if "@tunable" in ln)
    return {"search": line, "replace": line.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8")}


def test_edit_compile_submit_and_replay(setup, tmp_path):
    src = resolve("naive").source
    op, ctx = setup(reply(call("edit", tunable_edit(src))), reply(call("compile", {})),
                    reply(call("write_note", {"text": "ROWS_PER_BLOCK 8 compiles"})),
                    reply(call("submit", {"message": "ROWS_PER_BLOCK 4 -> 8"})))
    p = op.propose(ctx)
    assert "ROWS_PER_BLOCK 8" in p.source and p.message == "ROWS_PER_BLOCK 4 -> 8"
    assert (p.llm_calls, p.prompt_tokens, p.completion_tokens) == (4, 400, 40)
    assert p.meta["outcome"] == "submitted" and p.meta["tool_calls"]["compile"] == 1
    tool_msgs = [m for m in op.client.sent[-1] if m["role"] == "tool"]
    assert "compile: ok" in tool_msgs[1]["content"] and "registers=" in tool_msgs[1]["content"]
    path = tmp_path / p.meta["transcript"]
    kinds = [e["event"] for e in read(path)]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("response") == 4
    source, end = replay(path)
    assert source == p.source and end["outcome"] == "submitted"
    assert "ROWS_PER_BLOCK 8 compiles" in (tmp_path / "agent" / "notes.md").read_text()
    out = tmp_path / "replayed.cu"
    assert replay_main([str(path), "-o", str(out)]) == 0 and out.read_text() == p.source


def test_budget_end_submits_the_last_compiled_copy(setup, tmp_path):
    src = resolve("naive").source
    broken = {"search": "AVO_LAUNCH(", "replace": "AVO_LAUNCH_BROKEN("}
    op, ctx = setup(reply(call("edit", tunable_edit(src))), reply(call("compile", {})),
                    reply(call("edit", broken)), reply(call("compile", {})), reply(content="I am done."),
                    reply(call("view_source", {})))
    p = op.propose(ctx)
    assert p.meta["outcome"] == "auto_submitted" and "turn budget" in p.meta["stop"]
    assert "ROWS_PER_BLOCK 8" in p.source and "AVO_LAUNCH_BROKEN" not in p.source
    assert "not submitted by the model" in p.message
    fed_back = [m["content"] for m in op.client.sent[-1] if m["role"] == "user"]
    assert any("called no tool" in f for f in fed_back)
    assert any("compile: compile_error" in m["content"] for m in op.client.sent[-1] if m["role"] == "tool")
    assert replay(tmp_path / p.meta["transcript"])[0] == p.source


def test_nothing_usable_raises_proposal_error_with_accounting(setup, tmp_path):
    op, ctx = setup(reply(content=""), reply(content="x" * 50, finish="length"),
                    reply(call("edit", {"search": "no such text", "replace": "y"})),
                    reply(call("submit", {"message": "unchanged"})), LlmError("server gone"))
    with pytest.raises(ProposalError, match="LLM endpoint failed: server gone") as e:
        op.propose(ctx)
    p = e.value.proposal
    assert p.llm_calls == 4 and p.prompt_tokens == 400 and p.meta["outcome"] == "invalid"
    assert p.meta["tool_errors"] == 4 and p.meta["llm_errors"] == ["server gone"]
    sent = "\n".join(m["content"] for m in op.client.sent[-1] if m["role"] in ("user", "tool"))
    assert "was empty" in sent and "cut off" in sent and "edit not applied" in sent and "identical" in sent
    with pytest.raises(ReplayError, match="no candidate"):
        replay(tmp_path / p.meta["transcript"])


def test_text_edits_and_context_overflow_are_handled(setup, tmp_path):
    src = resolve("naive").source
    e = tunable_edit(src)
    text = f"<<<<<<< SEARCH\n{e['search']}\n=======\n{e['replace']}\n>>>>>>> REPLACE\n"
    op, ctx = setup(reply(content=text), ContextOverflow("maximum context length is 8192 tokens"),
                    reply(content='<tool_call>{"name": "submit", "arguments": {"message": "via text"}}</tool_call>'),
                    source_in_prompt=True)
    p = op.propose(ctx)
    assert "source omitted to fit the context" in op.client.sent[-1][1]["content"]
    assert p.meta["outcome"] == "submitted" and p.message == "via text" and "ROWS_PER_BLOCK 8" in p.source
    assert any("context overflow" in x for x in p.meta["llm_errors"])
    events = read(tmp_path / p.meta["transcript"])
    assert any(ev["event"] == "note" and ev["kind"] == "context_overflow" for ev in events)
    assert replay(tmp_path / p.meta["transcript"])[0] == p.source


def test_unknown_tool_in_config_is_rejected(cfg, tmp_path):
    bad = cfg.agent.copy()
    bad.tools = ["edit", "teleport"]
    with pytest.raises(ValueError, match="teleport"):
        LlmOperator(bad, tmp_path, Scripted())


def test_supervisor_uses_good_directions_and_survives_garbage(cfg, setup, tmp_path):
    from avo.agent.memory import Notes
    from avo.agent.supervisor import Supervisor

    (tmp_path / "lineage").mkdir()
    good = reply(content='{"action": "reset", "exhausted": "tiling", "directions": ['
                         '"Pipeline K/V loads three stages deep with cp.async", '
                         '"Skip the mask on fully visible causal key tiles"]}')
    for script, source, n in [((good,), "llm", 2), ((reply(content="Sure! Introduction..."),), "rules", 3),
                              ((LlmError("down"), LlmError("still down")), "rules", 3)]:
        notes = Notes(tmp_path)
        sup = Supervisor(cfg.agent, tmp_path, Scripted(*script), notes)
        _, ctx = setup()
        r = sup.review(ctx, "no commit in 8 steps")
        text = r.directive
        replied = not isinstance(script[0], LlmError)  # two failed requests: two calls, no tokens
        assert (r.model, r.llm_calls, r.prompt_tokens, r.completion_tokens) == (
            ("scripted", 1, 100, 10) if replied else ("scripted", 2, 0, 0))
        assert text.startswith(f"Supervisor ({source}") and "no commit in 8 steps" in text
        assert len([ln for ln in text.splitlines() if ln[:2] in ("1.", "2.", "3.")]) == n
        if source == "llm":
            assert "Restart from the best version v0" in text and "supervisor reset" in notes.read()
            assert sup.client.sent[0][0]["content"].count("no commit in 8 steps") == 1
