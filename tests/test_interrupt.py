"""A search stopped by SIGTERM while several workers evaluate (agent=mutation, harness=compile, real processes):
no attempt is blamed for the stop (the harness's workers are killed under them), the process ends with one
line and 143, and the same command resumes."""
import signal
import subprocess
import sys
import time

import polars as pl

from avo import lineage
from tests.test_agent_external_stops import ENV

FAULTS = {"crashed", "timeout", "error", "unavailable"}


def test_sigterm_under_several_workers_blames_no_candidate_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "avo.launch", "agent=mutation", "harness=compile", "seed=naive", "search.workers=2",
           "search.max_steps=200", f"harness.cache_dir={tmp_path / 'cubin'}", f"hydra.run.dir={run}"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "lineage").exists() or len(lineage.read_run(run)) < 5:
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in out + err, (out + err)[-3000:]
    assert out.splitlines()[-1].startswith("[avo.launcher] search interrupted by SIGTERM")
    rows = lineage.read_run(run)
    assert not set(rows["status"]) & FAULTS, rows.filter(pl.col("status").is_in(FAULTS))["error"].to_list()
    last = int(rows["step"].max())

    resumed = [f"search.max_steps={last + 1}" if a.startswith("search.max_steps=") else a for a in cmd]
    p = subprocess.run(resumed, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    after = lineage.read_run(run)
    assert after["run_id"].n_unique() == 1 and int(after["step"].max()) == last + 1 and len(after) > len(rows)
