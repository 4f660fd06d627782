"""agent=external as a Slurm job that is requeued under its agent (slurm/cluster.sh start; see tests/test_slurm.py).

`scontrol requeue` stops the job as a preemption does (SIGTERM): the open step is recorded as interrupted and
the endpoint files go; the requeued job resumes the lineage on a new port and token, and the agent's stdio
relay finds it there and works the next step."""
import json
import os
import subprocess
import sys

import anyio
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from avo import lineage
from avo.agent.mcp_server import endpoint_path
from avo.agent.transcript import read, transcript_path
from tests.test_agent_external import GOOD, call
from tests.test_slurm import ROOT, cluster, launch, log_text, record, wait_done, wait_for  # noqa: F401 - cluster

pytestmark = pytest.mark.slurm
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_a_requeued_external_search_records_the_open_step_and_its_stdio_agent_carries_on(tmp_path):
    run = tmp_path / "run"
    p = launch("agent=external", "harness=compile", "seed=naive", "search.attempts_per_step=1", "search.max_steps=2",
               f"harness.cache_dir={tmp_path}/cache", "launcher=slurm", "launcher.cpus_per_task=1",
               "launcher.mem_gb=2", "launcher.timeout_min=10", "launcher.signal_delay_s=30", "launcher.poll_s=1",
               f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = record(run)["job_id"]
    stdio = StdioServerParameters(command=sys.executable, args=["-m", "avo.agent.mcp_server", "--run-dir", str(run),
                                                                "--wait", "240"], env=ENV)

    async def agent():
        async with Client(stdio, client_info=types.Implementation(name="slurm-agent", version="1")) as c:
            text, ok = await call(c, "next_step", wait_seconds=240)
            assert ok and text.startswith("# Step 1"), text
            first = json.loads(endpoint_path(run).read_text())["pid"]
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            wait_for("the first job to stop", lambda: not endpoint_path(run).exists()
                     or json.loads(endpoint_path(run).read_text())["pid"] != first, timeout=120)
            text, ok = await call(c, "next_step", wait_seconds=240)
            for _ in range(2):  # the relay may learn of the lost connection from a call; the new job may be busy
                if ok and not text.startswith("not ready"):
                    break
                text, ok = await call(c, "next_step", wait_seconds=240)
            assert ok and text.startswith("# Step 2"), text
            assert (await call(c, "edit", **GOOD))[1]
            assert (await call(c, "submit", message="after the requeue"))[1]

    anyio.run(agent)
    assert wait_done(job_id, 300) == "COMPLETED", log_text(run)[-3000:]
    log = log_text(run)
    assert "search interrupted by SIGTERM: the attempt in flight is recorded as interrupted" in log
    assert "(restart 1)" in log and "Traceback" not in log
    rows = lineage.read_run(run).sort("step")
    assert rows["decision"].to_list() == ["seed", "interrupted", "unranked"]
    assert rows["message"][2] == "after the requeue" and rows["model"][2] == "slurm-agent 1"
    assert read(transcript_path(run, 1, 0))[-1]["outcome"] == "interrupted"
    assert not endpoint_path(run).exists()
