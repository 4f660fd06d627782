"""agent=external end to end: a real MCP client (the SDK's) drives whole steps of a real search (harness=compile).

The agent's decisions are scripted; the server, the transports (streamable HTTP, stdio), the CLI, the
search and the NVRTC harness are the real ones. Each test checks the lineage and the transcripts.
"""
import json
import os
import subprocess
import sys
import threading
from contextlib import asynccontextmanager

import anyio
import httpx2
import mcp_types as types
import polars as pl
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from avo import lineage
from avo.agent.mcp_server import endpoint_path, read_endpoint
from avo.agent.replay import replay
from avo.agent.transcript import read, transcript_path
from avo.search import run_search
from avo.seeds import resolve
from tests.conftest import ROOT

NAIVE = resolve("naive").source
TUNABLE = next(ln for ln in NAIVE.splitlines() if "@tunable" in ln and "ROWS_PER_BLOCK 4" in ln)
GOOD = {"search": TUNABLE, "replace": TUNABLE.replace("ROWS_PER_BLOCK 4", "ROWS_PER_BLOCK 8")}
BROKEN = {"search": "AVO_LAUNCH(", "replace": "AVO_LAUNCH_BROKEN("}


class SearchThread(threading.Thread):
    """The real search (run_search) with agent=external, in the background."""

    def __init__(self, cfg_factory, run_dir, *overrides, seed="naive"):
        super().__init__(daemon=True)
        self.cfg = cfg_factory("agent=external", "harness=compile", f"seed={seed}", "search.attempts_per_step=1",
                               "agent.budget.max_seconds=120", "agent.budget.idle_seconds=60",
                               f"harness.cache_dir={run_dir / 'cubin'}", *overrides, run_dir=run_dir)
        self.run_dir, self.summary, self.error = run_dir, None, None
        self.start()

    def run(self):
        try:
            self.summary = run_search(self.cfg)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive(), "the search did not end"
        assert self.error is None, repr(self.error)
        return lineage.read_run(self.run_dir).filter(pl.col("step") > 0).sort("step", "attempt")


@asynccontextmanager
async def http_agent(run_dir, mode="legacy", name="scripted-agent"):
    url, token = read_endpoint(run_dir, wait_s=120)
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                              timeout=httpx2.Timeout(30, read=600))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode,
                            client_info=types.Implementation(name=name, version="0.1")) as client:
        yield client


async def call(client, name, **args):
    r = await client.call_tool(name, args)
    return r.content[0].text, not r.is_error


async def next_step(client, **args):
    text, ok = await call(client, "next_step", wait_seconds=120, **args)
    assert ok, text
    return text


def events(run_dir, step):
    return read(transcript_path(run_dir, step, 0))


def test_an_http_agent_edits_compiles_submits_and_disconnects(cfg_factory, tmp_path):
    search = SearchThread(cfg_factory, tmp_path, "search.max_steps=3")

    async def agent():
        async with http_agent(tmp_path) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"next_step", "edit", "compile", "test", "benchmark", "profile", "submit", "lineage"} <= names
            ctx = await next_step(c, model="scripted-model")
            assert ctx.startswith("# Step 1, attempt 0") and "Committed versions" in ctx and "ROWS_PER_BLOCK" in ctx
            text, ok = await call(c, "edit", search="no such text", replace="x")
            assert not ok and "edit not applied" in text
            text, ok = await call(c, "frobnicate")
            assert not ok and "unknown tool 'frobnicate'" in text
            text, ok = await call(c, "compile", verbose=True)
            assert not ok and "unknown argument verbose" in text
            assert (await call(c, "edit", **BROKEN))[1]
            text, ok = await call(c, "compile")
            assert not ok and "compile: compile_error" in text
            assert (await call(c, "edit", search="AVO_LAUNCH_BROKEN(", replace="AVO_LAUNCH("))[1]
            text, ok = await call(c, "submit", message="unchanged")
            assert not ok and "identical to the best version" in text
            assert (await call(c, "edit", **GOOD))[1]
            text, ok = await call(c, "compile")
            assert ok and "registers=" in text
            assert (await call(c, "write_note", text="ROWS_PER_BLOCK 8 compiles"))[1]
            assert (await call(c, "submit", message="ROWS_PER_BLOCK 4 -> 8"))[1]
            text, ok = await call(c, "compile")
            assert not ok and "has ended (submitted)" in text

            ctx = await next_step(c)  # step 2: the verdict on step 1, then a garbage submission
            assert "Verdict on your submission 00001.00: unranked (status ok)" in ctx and "# Step 2" in ctx
            assert (await call(c, "edit", **BROKEN))[1]
            assert (await call(c, "submit", message="garbage"))[1]

            ctx = await next_step(c)  # step 3: leave in the middle
            assert "Verdict on your submission 00002.00: failed (status compile_error)" in ctx
            assert (await call(c, "edit", **GOOD))[1]
        # the agent is gone (its session closed): step 3 ends at once, not at a budget

    anyio.run(agent)
    rows = search.finish()
    assert rows["step"].to_list() == [1, 2, 3]
    assert rows["operator"].to_list() == ["external"] * 3
    assert rows["model"].to_list() == ["scripted-model", "scripted-agent 0.1", "scripted-agent 0.1"]
    assert rows["status"].to_list() == ["ok", "compile_error", "invalid"]
    assert "the agent disconnected" in rows["error"][2] and rows["propose_s"][2] < 30
    first = rows.row(0, named=True)
    assert "ROWS_PER_BLOCK 8" in lineage.read_source(tmp_path, first["source_sha"])
    assert json.loads(first["extra"])["client"] == "scripted-agent 0.1"

    # transcripts: every call and result, replayable to the submitted source
    ev = events(tmp_path, 1)
    calls = [e["name"] for e in ev if e["event"] == "tool_call"]
    assert calls == ["edit", "frobnicate", "compile", "edit", "compile", "edit", "submit", "edit", "compile",
                     "write_note", "submit"]
    assert len([e for e in ev if e["event"] == "tool_result"]) == len(calls)
    source, end = replay(transcript_path(tmp_path, 1, 0))
    assert end["outcome"] == "submitted" and source == lineage.read_source(tmp_path, first["source_sha"])
    assert "ROWS_PER_BLOCK 8 compiles" in (tmp_path / "agent" / "notes.md").read_text()
    last = events(tmp_path, 3)
    assert any(e["event"] == "note" and e["kind"] == "disconnected" for e in last)
    assert last[-1]["event"] == "end" and last[-1]["outcome"] == "invalid"
    assert not endpoint_path(tmp_path).exists()  # the endpoint is gone with the search


def test_budgets_and_silence_end_steps_and_the_search_goes_on(cfg_factory, tmp_path):
    search = SearchThread(cfg_factory, tmp_path, "search.max_steps=4", "agent.budget.max_tool_calls=3",
                          "agent.budget.idle_seconds=4", "agent.budget.max_seconds=8",
                          "search.stagnation.no_commit_steps=2")
    token_file = tmp_path / "agent" / "mcp.token"

    async def agent():
        url, _ = read_endpoint(tmp_path, wait_s=120)
        assert url.startswith("http://127.0.0.1:")
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx2.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers)
            assert r.status_code == 401 and str(token_file) in r.json()["error"]
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        async with http_agent(tmp_path, mode="auto") as c:  # a sessionless (2026) client
            await next_step(c)
            for _ in range(3):
                assert (await call(c, "lineage"))[1]
            text, ok = await call(c, "lineage")
            assert not ok and "tool-call budget used up" in text
            await next_step(c)  # step 2: then silence
            await anyio.sleep(6)
            text = await next_step(c)  # step 3: busy with cheap context calls until the time budget ends
            assert "Supervisor (rules) after: no commit in 2 steps" in text  # the stall's directions
            for _ in range(20):
                if "# Step 3" not in text:
                    break
                await anyio.sleep(1)
                text = await next_step(c)
            assert "# Step 4" in text  # step 4 opened: leave it to the idle limit

    anyio.run(agent)
    rows = search.finish()
    assert rows["decision"].to_list() == ["invalid"] * 4
    errors = rows["error"].to_list()
    assert "tool-call budget used up (3 of agent.budget.max_tool_calls=3)" in errors[0]
    assert "the agent was silent for 4 s" in errors[1] and "no agent called" not in errors[1]
    assert "time budget used up (8 s" in errors[2]
    assert 7 < rows["propose_s"][2] < 20
    assert all(events(tmp_path, s)[-1]["outcome"] == "invalid" for s in (1, 2, 3))
    sup = lineage.scan_supervisor([tmp_path]).collect()
    assert len(sup) >= 1 and set(sup["operator"]) == {"external"}
    assert not (tmp_path / "agent" / "mcp.token").exists()


def test_a_stdio_agent_and_the_shell_cli_work_steps_with_the_same_records(cfg_factory, tmp_path):
    search = SearchThread(cfg_factory, tmp_path, "search.max_steps=3")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    stdio = StdioServerParameters(command=sys.executable, args=["-m", "avo.agent.mcp_server", "--run-dir",
                                                                str(tmp_path)], cwd=str(ROOT), env=env)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "avo.tool", str(tmp_path), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout + r.stderr

    async def agent():
        async with Client(stdio, client_info=types.Implementation(name="stdio-agent", version="3")) as c:
            await next_step(c)
            assert (await call(c, "edit", **GOOD))[1]
            assert (await call(c, "compile"))[1]
            assert (await call(c, "submit", message="via stdio"))[1]

        (tmp_path / "old.txt").write_text(GOOD["search"])
        (tmp_path / "new.txt").write_text(GOOD["replace"].replace("ROWS_PER_BLOCK 8", "ROWS_PER_BLOCK 2"))
        rc, out = cli("next_step", "wait_seconds=120", "model=shell-model")
        assert rc == 0 and "# Step 2" in out and "Verdict on your submission 00001.00: unranked" in out
        assert cli("edit", f"search=@{tmp_path / 'old.txt'}", f"replace=@{tmp_path / 'new.txt'}")[0] == 0
        rc, out = cli("compile")
        assert rc == 0 and "compile: ok" in out
        assert cli("compile", "verbose=1") == (1, "compile: unknown argument verbose; nothing was run (parameters: "
                                                  "none)\n")
        assert cli("edit", "nonsense")[0] == 2
        assert cli("submit", "message=via the shell")[0] == 0

        async with Client(stdio, client_info=types.Implementation(name="stdio-agent", version="3")) as c:
            await next_step(c)
            assert (await call(c, "edit", **BROKEN))[1]
        # the agent closed stdio: the relay ends its session, which ends the step

    anyio.run(agent)
    rows = search.finish()
    assert rows["message"].to_list()[:2] == ["via stdio", "via the shell"]
    assert rows["model"].to_list() == ["stdio-agent 3", "shell-model", "stdio-agent 3"]
    assert "the agent disconnected" in rows["error"][2] and rows["propose_s"][2] < 30
    for step in (1, 2):
        source, _ = replay(transcript_path(tmp_path, step, 0))
        assert source == lineage.read_source(tmp_path, rows["source_sha"][step - 1])
    shell = [e for e in events(tmp_path, 2) if e["event"] == "tool_result"]
    assert [e["name"] for e in shell] == ["edit", "compile", "compile", "submit"]
    rc, out = cli("compile")  # the search has ended: one clear line
    assert rc == 2 and "is a search with agent=external running in that run directory?" in out


def test_the_cli_submits_a_batch_of_candidates_and_reads_each_verdict_from_the_lineage(cfg_factory, tmp_path):
    """`avo.tool <run> --batch FILE`: candidates written ahead of time go in one per step; one that does not
    compile is not submitted and the same step takes the next file; each verdict is the lineage's row."""
    run = tmp_path / "run"
    search = SearchThread(cfg_factory, run, "search.max_steps=2")
    files = {name: tmp_path / f"{name}.cu" for name in ("rows8", "broken", "rows2")}
    files["rows8"].write_text(NAIVE.replace(GOOD["search"], GOOD["replace"]))
    files["broken"].write_text(NAIVE.replace(BROKEN["search"], BROKEN["replace"]))
    files["rows2"].write_text(NAIVE.replace(GOOD["search"], GOOD["replace"].replace("ROWS_PER_BLOCK 8",
                                                                                     "ROWS_PER_BLOCK 2")))
    listing = tmp_path / "batch.txt"
    listing.write_text(f"# written between device calls\n{files['rows8']} ROWS_PER_BLOCK 8\n\n"
                       f"{files['broken']} a typo\n{files['rows2']} ROWS_PER_BLOCK 2\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "avo.tool", str(run), "--batch", str(listing), "--model", "batch-model",
                        "--wait", "120"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = search.finish()
    assert r.returncode == 1, r.stdout + r.stderr  # one file of three was not submitted
    table = r.stdout[r.stdout.index("| file | verdict |"):]
    assert f"| {files['rows8']} | 00001.00 unranked |" in table
    assert f"| {files['broken']} | not submitted: compile: compile_error" in table
    assert f"| {files['rows2']} | 00002.00 unranked |" in table
    assert rows["message"].to_list() == ["ROWS_PER_BLOCK 8", "ROWS_PER_BLOCK 2"]
    assert rows["model"].to_list() == ["batch-model", "batch-model"]
    bad = subprocess.run([sys.executable, "-m", "avo.tool", str(run), "--batch", str(tmp_path / "none.txt")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr
