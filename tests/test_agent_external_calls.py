"""agent=external as a coding agent meets it, through the SDK's client against a real search (harness=compile):
whole sources, typed arguments, results that checked nothing, long calls (progress, 'not ready'), the
server's version and the seed's operator."""
import json
import os
import re
import subprocess
import sys
from importlib import metadata

import anyio

from avo import lineage
from avo.agent.mcp_server import read_endpoint
from avo.seeds import resolve
from tests.conftest import ROOT
from tests.test_agent_external import SearchThread, call, http_agent

SM90 = resolve("sm90").source


def test_sm90_whole_source_typed_arguments_and_results_that_checked_nothing(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setattr("avo.agent.mcp_server.HEARTBEAT_S", 0.25)
    search = SearchThread(cfg_factory, tmp_path, "search.max_steps=1", seed="sm90")
    progress = []

    async def agent():
        async with http_agent(tmp_path) as c:
            assert c.server_info.name == "avo" and c.server_info.version == metadata.version("avo")
            # the seed is still being evaluated: no step yet, which is an answer, not an error
            text, ok = await call(c, "next_step", wait_seconds=0)
            assert ok and text.startswith("not ready: no step is open after 0 s") and "call next_step again" in text

            async def on_progress(done, total, message):
                progress.append((done, message))

            r = await c.call_tool("next_step", {"wait_seconds": 120}, progress_callback=on_progress)
            assert not r.is_error and r.content[0].text.startswith("# Step 1, attempt 0")
            assert progress and progress[0][1].startswith("next_step: still running after")
            assert [p for p, _ in progress] == sorted(p for p, _ in progress)

            # the whole kernel (over 500 lines), in parts whose headers claim only the lines they show
            n = len(SM90.splitlines())
            lines, start = [], 1
            while True:
                text, ok = await call(c, "view_source", **({"start_line": start} if start > 1 else {}))
                head, *body = text.splitlines()
                lo, hi = (int(x) for x in head.split(" lines ")[1].split(" of ")[0].split("-"))
                assert ok and lo == start and head.split(" of ")[1].startswith(str(n))
                rows = [b for b in body if not b.startswith("[")]
                assert [int(b.split()[0]) for b in rows] == list(range(lo, hi + 1)) and "characters cut" not in text
                lines += [b[6:] for b in rows]
                if hi == n:
                    break
                assert f"lines {hi + 1}-{n} not shown" in head and f"start_line={hi + 1}" in body[-1]
                start = hi + 1
            assert "\n".join(lines) + "\n" == SM90 and start > 1

            # arguments are checked against the input schema before anything runs
            line = next(ln for ln in SM90.splitlines() if "@tunable" in ln)
            for args, why in (({"search": line, "replace": None}, "replace must be a string, got null"),
                              ({"search": 5, "replace": "x"}, "search must be a string, got an integer 5"),
                              ({"search": line}, "missing replace")):
                text, ok = await call(c, "edit", **args)
                assert not ok and text.startswith("edit: ") and why in text and "nothing was run" in text
            text, ok = await call(c, "view_source", start_line="3")
            assert not ok and "start_line must be an integer, got a string" in text
            text, ok = await call(c, "next_step", wait_seconds="soon")
            assert not ok and "wait_seconds must be a number" in text
            assert await call(c, "diff", a="best", b="current") == ("(no difference)", True)

            # harness=compile runs no kernel: test and benchmark are not passes
            assert (await call(c, "edit", search=line, replace="// an agent's note\n" + line))[1]
            text, ok = await call(c, "compile")
            assert ok and text.startswith("compile: ok")
            for tool in ("test", "benchmark"):
                text, ok = await call(c, tool)
                assert not ok and text.startswith(f"unchecked: {tool} ran no kernel") and "not a pass" in text
            assert (await call(c, "submit", message="a note"))[1]
            text, ok = await call(c, "next_step", wait_seconds=120)
            assert not ok and text.startswith("the search has ended: ")

    anyio.run(agent)
    search.finish()
    rows = lineage.read_run(tmp_path).sort("step")
    assert rows["operator"].to_list() == ["seed", "external"] and rows["model"][0] == ""


def doc_blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "external-agent.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def test_the_documented_python_client_works_steps_until_the_search_ends(cfg_factory, tmp_path):
    (client,) = [b for b in doc_blocks("python") if "streamable_http_client" in b]
    script = tmp_path / "client.py"
    script.write_text(client)
    search = SearchThread(cfg_factory, tmp_path, "search.max_steps=2", seed="sm90")
    read_endpoint(tmp_path, wait_s=120)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == ["step 1: compile: ok", "step 2: compile: ok",
                                     "the search has ended: the search stopped"], r.stdout
    rows = search.finish()
    assert rows["message"].to_list() == ["a comment in step 1", "a comment in step 2"]
    assert rows["model"].to_list() == ["my-model"] * 2 and rows["status"].to_list() == ["ok"] * 2
    # step 2 started from the best version: v1 if step 1 was committed, else the seed
    first = lineage.read_source(tmp_path, rows["source_sha"][0])
    assert first == SM90 + "// my agent was here in step 1\n"
    base = first if rows["committed"][0] else SM90
    assert lineage.read_source(tmp_path, rows["source_sha"][1]) == base + "// my agent was here in step 2\n"


def test_the_documented_client_configurations_are_what_print_config_writes(tmp_path):
    entries = {}
    for block in doc_blocks("json"):
        entries.update(json.loads(block)["mcpServers"])
    printed = json.loads(subprocess.run([sys.executable, "-m", "avo.agent.mcp_server", "--run-dir", str(tmp_path),
                                         "--print-config"], cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout)["mcpServers"]["avo"]
    assert printed == {"command": sys.executable, "args": ["-m", "avo.agent.mcp_server", "--run-dir",
                                                           str(tmp_path.resolve())]}
    assert set(entries["avo"]) == set(printed) and entries["avo"]["args"][:3] == printed["args"][:3]
    assert entries["avo-http"]["headers"]["Authorization"].startswith("Bearer ")
