"""Pure logic of the agent: budgets, tool-call parsing and dispatch, supervisor rules, knowledge, notes."""
import json
import random
from pathlib import Path

import pytest

from avo.agent import render
from avo.agent.knowledge import KnowledgeBase, lessons, split_markdown
from avo.agent.memory import Notes
from avo.agent.operator import Budget, compact, text_tool_calls
from avo.agent.supervisor import clean, parse_directions
from avo.agent.tools import NAMES, SCHEMAS, Workbench, truncate
from avo.agent.transcript import Transcript, read
from avo.types import Attempt, Problem, Shape, Status, StepContext, Version

AGENT_DIR = Path(__file__).resolve().parents[1] / "avo" / "agent"


def ctx(tmp_path, source="AVO_LAUNCH(32,0,1,0,0,0);\nvoid avo_attention() { int x = 1; }\n", failures=()):
    shape = Shape(1, 16, 16, 2, 2, 64, False)
    problem = Problem("mha", 2, 2, 64, (shape,), (shape,))
    v0 = Version(0, "00000.00", source, None, [], "seed")
    v1 = Version(1, "00001.00", source.replace("= 1", "= 2"), None, [], "x = 2")
    return StepContext(3, 0, v1, [v0, v1], list(failures), problem, bench=None, run_dir=tmp_path,
                       rng=random.Random(0), tried=set())


# -- budgets ---------------------------------------------------------------------------------------
def test_budget_each_limit_ends_the_step():
    b = Budget(max_turns=10, max_tokens=1000, max_seconds=60)
    assert b.exhausted(9, 999, 59) is None
    assert "turn budget" in b.exhausted(10, 0, 0)
    assert "token budget" in b.exhausted(0, 1000, 0)
    assert "time budget" in b.exhausted(0, 0, 60)
    assert b.left(5, 100, 6) == pytest.approx(0.5)


# -- tool calls written as text --------------------------------------------------------------------
def test_text_tool_calls_hermes_and_bare_json():
    assert text_tool_calls('<tool_call>\n{"name": "compile", "arguments": {}}\n</tool_call>') == [("compile", {})]
    assert text_tool_calls('{"name": "edit", "parameters": {"search": "a", "replace": "b"}}') == [
        ("edit", {"search": "a", "replace": "b"})]
    assert text_tool_calls("I refuse.") == []
    assert text_tool_calls("<tool_call>{not json}</tool_call>") == []


# -- dispatch of malformed calls -------------------------------------------------------------------
@pytest.mark.parametrize("name,args,msg", [
    ("frobnicate", "{}", "unknown tool 'frobnicate'"),
    ("edit", "{bad json", "not valid JSON"),
    ("edit", "[1, 2]", "must be a JSON object"),
    ("edit", '{"search": "x"}', "missing replace"),
    ("compile", '{"fast": true}', "unknown argument fast"),
    ("view_source", '{"which": "v9"}', "unknown source 'v9'"),
    ("edit", '{"search": "int y", "replace": "int z"}', "edit not applied"),
    ("submit", '{"message": "same"}', "identical to the best"),
])
def test_malformed_calls_come_back_as_errors(tmp_path, name, args, msg):
    bench = Workbench(ctx(tmp_path), Notes(tmp_path), KnowledgeBase())
    r = bench.call(name, args)
    assert not r.ok and msg in r.text
    assert bench.errors == 1 and bench.submitted is None


def test_tools_not_offered_are_unknown(tmp_path):
    bench = Workbench(ctx(tmp_path), Notes(tmp_path), KnowledgeBase(), offered=("edit", "submit"))
    r = bench.call("view_source", {})
    assert not r.ok and "unknown tool 'view_source'; the tools are: edit, submit" in r.text


def test_edit_view_diff_and_submit(tmp_path):
    c = ctx(tmp_path, failures=[])
    bench = Workbench(c, Notes(tmp_path), KnowledgeBase())
    r = bench.call("edit", {"search": "int x = 2;", "replace": "int x = 3;"})
    assert r.ok and r.source_changed and "+void avo_attention() { int x = 3; }" in r.text
    assert "int x = 3" in bench.call("view_source", "{}").text
    assert "-void avo_attention() { int x = 2; }" in bench.call("diff", {"a": "best", "b": "current"}).text
    assert "int x = 1" in bench.call("view_source", {"which": "v0"}).text
    assert bench.call("submit", {"message": "x = 3"}).ok
    assert bench.submitted == (bench.source, "x = 3")


def test_submit_refuses_an_already_evaluated_source(tmp_path):
    c = ctx(tmp_path)
    src = c.best.source.replace("= 2", "= 4")
    c.failures.append(Attempt("00003.00", src, Status.INCORRECT, "failed", None, "wrong", "x = 4"))
    bench = Workbench(c, Notes(tmp_path), KnowledgeBase())
    bench.call("edit", {"search": "= 2", "replace": "= 4"})
    r = bench.call("submit", {"message": "again"})
    assert not r.ok and "already evaluated" in r.text
    assert "attempt0: incorrect/failed" in bench.call("lineage", {}).text


def test_long_tool_output_is_truncated():
    cut = truncate("x" * 10_000, 1000)
    assert len(cut) < 1100 and "[9000 characters cut]" in cut


def test_view_source_pages_whole_lines_and_says_where_the_next_part_starts(tmp_path):
    source = "AVO_LAUNCH avo_attention\n" + "".join(f"int a{i};\n" for i in range(700))
    bench = Workbench(ctx(tmp_path, source=source), Notes(tmp_path), KnowledgeBase(), output_chars=2000)
    seen, start = [], 1
    while True:
        r = bench.call("view_source", {"which": "v0", "start_line": start})
        assert r.ok and len(r.text) <= 2000 and "characters cut" not in r.text
        head, *body = r.text.splitlines()
        lo, hi = (int(x) for x in head.split(" lines ")[1].split(" of ")[0].split("-"))
        assert lo == start and [int(b.split()[0]) for b in body if not b.startswith("[")] == list(range(lo, hi + 1))
        seen += [b[6:] for b in body if not b.startswith("[")]
        if hi == 701:
            assert "not shown" not in r.text
            break
        assert f"lines {hi + 1}-701 not shown" in head and body[-1].endswith(f"start_line={hi + 1}]")
        start = hi + 1
    assert "\n".join(seen) + "\n" == source
    assert not bench.call("view_source", {"start_line": 900}).ok


@pytest.mark.parametrize("args,msg", [
    ({"search": "int x = 2;", "replace": None}, "replace must be a string, got null"),
    ({"search": 2, "replace": "x"}, "search must be a string, got an integer 2"),
    ({"search": ["int x = 2;"], "replace": "x"}, "search must be a string, got an array"),
])
def test_arguments_of_the_wrong_type_are_refused_and_change_nothing(tmp_path, args, msg):
    bench = Workbench(ctx(tmp_path), Notes(tmp_path), KnowledgeBase())
    before = bench.source
    r = bench.call("edit", args)
    assert not r.ok and msg in r.text and "nothing was run" in r.text and "replace (string)" in r.text
    assert bench.source == before


def test_integer_and_number_arguments(tmp_path):
    bench = Workbench(ctx(tmp_path), Notes(tmp_path), KnowledgeBase())
    assert bench.call("view_source", {"start_line": 2.0}).text.startswith("current lines 2-2 of 2")
    for bad, msg in ((True, "must be an integer, got a boolean"), ("2", "must be an integer, got a string"),
                     (2.5, "must be an integer, got a number")):
        r = bench.call("view_source", {"start_line": bad})
        assert not r.ok and msg in r.text
    r = bench.call("view_source", '{"end_line": NaN}')
    assert not r.ok and "end_line must be an integer" in r.text


def test_every_parameter_type_is_one_the_checker_knows():
    from avo.agent.desk import NEXT_STEP
    from avo.agent.tools import JSON_TYPES

    for s in [*SCHEMAS, NEXT_STEP]:
        for key, p in s["function"]["parameters"]["properties"].items():
            assert p["type"] in JSON_TYPES, (s["function"]["name"], key)


def test_schemas_are_valid_openai_functions():
    assert len(NAMES) == len(set(NAMES)) == len(SCHEMAS)
    for s in SCHEMAS:
        p = s["function"]["parameters"]
        assert p["type"] == "object" and set(p["required"]) <= set(p["properties"])
        json.dumps(s)
    assert {"edit", "rewrite", "compile", "test", "benchmark", "profile", "search_knowledge", "read_notes",
            "write_note", "submit", "view_source", "diff"} <= set(NAMES)


# -- context compaction ----------------------------------------------------------------------------
def test_compact_shrinks_old_tool_results_then_the_source():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u" * 5000 + "```cuda\ncode\n```"}]
    for i in range(8):
        msgs += [{"role": "assistant", "content": ""}, {"role": "tool", "tool_call_id": str(i), "content": "r" * 5000}]
    assert compact(msgs)
    assert sum(len(m["content"]) for m in msgs if m["role"] == "tool") < 5 * 5000
    assert compact(msgs)  # nothing old left to cut: drops the source from the first message
    assert "source omitted" in msgs[1]["content"]
    assert not compact(msgs)


# -- supervisor rules ------------------------------------------------------------------------------
def test_parse_directions_json_list_and_garbage():
    reply = ('Sure.\n{"action": "reset", "directions": ["Use wgmma for QK^T with a 64x128 tile", '
             '"Deeper K/V pipeline with three stages"]}')
    assert parse_directions(reply) == ("reset", ["Use wgmma for QK^T with a 64x128 tile",
                                                 "Deeper K/V pipeline with three stages"])
    action, items = parse_directions("1. Split the causal loop into masked and unmasked parts\n- Try exp2 folding")
    assert action == "redirect" and len(items) == 2
    assert parse_directions("Sure! (1)\n\nIntroduction blah") == ("redirect", [])
    single = parse_directions('{"directions": "one single direction as a string"}')
    assert single[1] == ["one single direction as a string"]


def test_clean_drops_duplicates_vague_and_previous():
    prev = ["Use wgmma for the QK product"]
    items = ["use WGMMA for the QK product!", "optimize it", "x" * 700, "Persistent grid walking long tiles first",
             "persistent grid walking long tiles first", "Fold the scale into exp2 for one FMA per score"]
    assert clean(items, prev, 5) == ["Persistent grid walking long tiles first",
                                     "Fold the scale into exp2 for one FMA per score"]
    assert len(clean(items, [], 1)) == 1


# -- knowledge -------------------------------------------------------------------------------------
def test_knowledge_search_ranks_the_right_section():
    kb = KnowledgeBase()
    assert kb.search("mbarrier parity hang")[0][1].title.startswith("mbarrier")
    assert kb.search("causal mask diagonal tile")[0][1].title == "Causal masking"
    assert kb.search("AVO_LAUNCH tma rows launch metadata")[0][1].doc == "CONTRACT.md"  # indexed in place
    assert "nothing in the knowledge base" in kb.render("zzzqqq")


def test_knowledge_includes_the_lineage_lessons():
    history = [Version(0, "a", "", 100.0, [], "seed"),
               Version(1, "b", "", 99.0, [], "pipeline K/V with 3 stages", ratio=1.01, ratio_lo=1.004, ratio_hi=1.016)]
    # v1's own score is below v0's (another evaluation, other clocks); what its commit proved is the paired ratio
    assert "x1.0100 [1.0040, 1.0160] over v0 timed side by side" in lessons(history) and "%" not in lessons(history)
    kb = KnowledgeBase(history=history)
    hit = kb.search("stages pipeline lessons")[0][1]
    assert hit.doc == "lineage" and "v1" in hit.title


def test_split_markdown_keeps_code_headings_in_their_section():
    parts = split_markdown("d", "# A\ntext\n```\n# not a heading\n```\n# B\nmore\n")
    assert [p.title for p in parts] == ["A", "B"] and "# not a heading" in parts[0].text


def test_missing_knowledge_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="agent.knowledge_dirs"):
        KnowledgeBase([tmp_path / "nope"])


# -- notes -----------------------------------------------------------------------------------------
def test_notes_persist_age_out_and_reset(tmp_path):
    n = Notes(tmp_path, show_chars=300)
    assert n.recent() == ""
    for i in range(10):
        n.add(i, f"idea {i}: " + "z" * 40)
    assert Notes(tmp_path, show_chars=300).recent().count("## step") < 10  # a fresh object reads the file
    assert "idea 9" in n.recent() and "older ones omitted" in n.recent()
    n.reset(10, "restart from v3")
    n.add(11, "after the reset")
    assert "idea 9" not in n.recent() and "restart from v3" in n.recent() and "after the reset" in n.recent()
    assert "idea 0" in n.read()
    with pytest.raises(ValueError):
        n.add(1, "   ")


# -- transcripts and prompts -----------------------------------------------------------------------
def test_transcript_roundtrip_and_truncated_tail(tmp_path):
    p = tmp_path / "t.jsonl"
    with Transcript(p) as tr:
        tr.event("start", source="x")
        tr.event("end", outcome="invalid")
    assert [e["event"] for e in read(p)] == ["start", "end"]
    p.write_text(p.read_text() + '{"event": "tool_ca')  # a killed step
    assert len(read(p)) == 2
    p.write_text('{"bad\n' + p.read_text())
    with pytest.raises(ValueError, match=":1 is not valid JSON"):
        read(p)


def test_prompts_render_and_missing_values_fail():
    assert "Step 3, attempt 0" in render.render("step", step=3, attempt=0, problem="p", harness="h", budget="b",
                                                 lineage="l", best_version=1, best_score="s", best_configs="",
                                                 directive="", notes="", source="")
    with pytest.raises(KeyError):
        render.render("step", step=1)
    assert set(render.sections("feedback")) >= {"no_tool_call", "empty", "cut_off", "budget_low"}
    assert len(render.lines("directions")) >= 8


def test_agent_modules_stay_small():
    for f in AGENT_DIR.glob("*.py"):
        assert len(f.read_text().splitlines()) <= 400, f


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["smollm", "qwen", "gpt_oss", "openai"])
def test_agent_configs_compose_and_pass_the_checks(name):
    from hydra import compose, initialize_config_dir

    from avo.agent import check
    from avo.config import register

    register()
    with initialize_config_dir(config_dir=str(AGENT_DIR.parents[1] / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"agent={name}", "run_dir=/tmp/unused"])
    assert cfg.agent.kind == "llm"
    check(cfg.agent)
    if name in ("qwen", "gpt_oss"):  # the LLM never shares the GPU the harness times on
        assert cfg.harness.device not in cfg.agent.server.gpus


def test_bad_agent_values_are_one_line_errors():
    from omegaconf import OmegaConf

    from avo.agent import check
    from avo.config import ConfigError, LlmAgentConf

    base = OmegaConf.structured(LlmAgentConf(name="x", model="m"))
    for key, value, msg in [("budget.max_turns", 0, "max_turns=0"), ("sampling.tool_choice", "always", "auto or"),
                            ("server.tensor_parallel_size", 2, "needs as many")]:
        cfg = base.copy()
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError, match=msg):
            check(cfg)


def test_the_supervisor_and_the_external_verdict_read_their_island_from_the_step_context(tmp_path, monkeypatch):
    """With islands, a run's files hold every island's attempts and directions; an operator is given its own
    island's in its StepContext, and reads nothing of the lineage from disk."""
    from types import SimpleNamespace

    from avo import lineage
    from avo.agent.external import ExternalOperator
    from avo.agent.memory import Notes
    from avo.agent.supervisor import Supervisor
    from avo.lineage import sha256

    def no_disk(*a, **kw):
        raise AssertionError("an operator read the lineage from disk")

    monkeypatch.setattr(lineage, "read_run", no_disk)
    monkeypatch.setattr(lineage, "scan_supervisor", no_disk)
    c = ctx(tmp_path)
    mine = "AVO_LAUNCH(32,0,1,0,0,0);\nvoid avo_attention() { int x = 3; }\n"
    c.recent = [Attempt("00004.01", mine, Status.OK, "not_faster", 101.5, "", "wider K tile", None),
                Attempt("00005.00", "x", Status.COMPILE_ERROR, "failed", None, "error: no such name\nmore", "tile")]
    c.directions = ["Supervisor (rules) after: no commit in 8 steps. Pick one:\n1. Pipeline K and V loads deeper\n"
                    "2. Skip the mask on fully visible tiles"]
    sup = Supervisor(SimpleNamespace(llm_supervisor=False), tmp_path, None, Notes(tmp_path))
    assert sup.previous(c) == ["Pipeline K and V loads deeper", "Skip the mask on fully visible tiles"]
    _, attempts = sup.trajectory(c)
    assert attempts.splitlines() == ["step 4.1: not_faster/ok 101.5 - wider K tile",
                                     "step 5.0: failed/compile_error - tile | error: no such name"]
    r = sup.review(c, "no commit in 8 steps")
    assert "Pipeline K and V loads deeper" not in r.directive  # a direction given before is not given again
    op = object.__new__(ExternalOperator)
    op._last_sha = sha256(mine)
    assert op.verdict(c) == "Verdict on your submission 00004.01: not_faster (status ok, 101.5 TFLOPS).\n\n"
    op._last_sha = sha256("a submission of another island")
    assert op.verdict(c) == ""
