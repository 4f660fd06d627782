"""agent=external stopped from outside: SIGTERM and SIGINT on a real `python -m avo.launch` search, with an agent
on the stdio relay that the search's own --print-config describes, kept across the restart (harness=compile)."""
import json
import os
import signal
import subprocess
import sys

import anyio
import mcp_types as types
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from avo import lineage
from avo.agent.mcp_server import endpoint_path, read_endpoint
from avo.agent.transcript import read, transcript_path
from tests.conftest import ROOT
from tests.test_agent_external import BROKEN, GOOD, call

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def start_search(run_dir):
    cmd = [sys.executable, "-m", "avo.launch", "agent=external", "harness=compile", "seed=naive",
           "search.attempts_per_step=1", "search.max_steps=4", f"harness.cache_dir={run_dir / 'cubin'}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(p, sig):
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


def test_sigterm_and_sigint_record_the_step_remove_the_endpoint_and_the_relay_outlives_the_restart(tmp_path):
    run = tmp_path / "run"
    first = start_search(run)
    cfg = json.loads(subprocess.run([sys.executable, "-m", "avo.agent.mcp_server", "--run-dir", str(run),
                                     "--print-config"], env=ENV, capture_output=True, text=True, check=True).stdout)
    entry = cfg["mcpServers"]["avo"]
    assert entry["command"] == sys.executable and entry["args"][-1] == str(run.resolve())
    stdio = StdioServerParameters(command=entry["command"], args=entry["args"], env=ENV)
    token_file = run / "agent" / "mcp.token"
    ended = {}

    async def agent():
        async with Client(stdio, client_info=types.Implementation(name="stdio-agent", version="1")) as c:
            text, ok = await call(c, "next_step", wait_seconds=120)
            assert ok and text.startswith("# Step 1"), text
            assert (await call(c, "edit", **GOOD))[1]
            old_url, _ = read_endpoint(run)
            ended["term"] = await anyio.to_thread.run_sync(stop, first, signal.SIGTERM)
            assert not endpoint_path(run).exists() and not token_file.exists()

            second = start_search(run)  # the same command resumes the run, on a new port with a new token
            text, ok = await call(c, "next_step", wait_seconds=120)
            if not ok:  # the relay learnt of the lost connection from this call
                assert "the connection to the search was lost" in text and "Call next_step" in text, text
                text, ok = await call(c, "next_step", wait_seconds=120)
            assert ok and text.startswith("# Step 2"), text
            assert read_endpoint(run)[0] != old_url
            assert (await call(c, "edit", **BROKEN))[1]
            ended["int"] = await anyio.to_thread.run_sync(stop, second, signal.SIGINT)

    anyio.run(agent)
    for key, status, name in (("term", 143, "SIGTERM"), ("int", 130, "SIGINT")):
        rc, out, err = ended[key]
        assert rc == status, (out + err)[-3000:]
        assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
        assert out.splitlines()[-1] == (f"[avo.launcher] search interrupted by {name}: the attempt in flight is "
                                        f"recorded as interrupted; the same command resumes {run}")
    assert not endpoint_path(run).exists() and not token_file.exists()
    rows = lineage.read_run(run).sort("step")
    assert rows["decision"].to_list() == ["seed", "interrupted", "interrupted"]
    assert rows["status"].to_list() == ["ok", "interrupted", "interrupted"]
    assert [e.split(" before")[0] for e in rows["error"][1:]] == ["interrupted by SIGTERM", "interrupted by SIGINT"]
    for step, why in ((1, "SIGTERM"), (2, "SIGINT")):
        end = read(transcript_path(run, step, 0))[-1]
        assert end["event"] == "end" and end["outcome"] == "interrupted" and why in end["reason"]
