"""launcher=slurm on a real Slurm cluster (slurm/cluster.sh start): sweeps, requeues, hard kills, bad input.

Skipped when no cluster answers, unless AVO_REQUIRE_SLURM=1 (CI), where that is a failure. Searches
use harness=compile with a fresh NVRTC cache, so every attempt is a real compile (~1 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from avo import lineage

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
ATTEMPTS = 2


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    for cmd in (["scontrol", "ping"], ["sacct", "-n", "-X", "-S", "now"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or "DOWN" in p.stdout:
            return f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()[:200]}"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    why = _cluster_problem()
    if why:
        if os.environ.get("AVO_REQUIRE_SLURM") == "1":
            pytest.fail(f"AVO_REQUIRE_SLURM=1 but the Slurm cluster is not usable ({why}); run slurm/cluster.sh start")
        pytest.skip(f"no Slurm cluster ({why}); slurm/cluster.sh start")


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """The naive kernel with three more tunables, so the mutation operator has ~1000 distinct variants."""
    src = (ROOT / "kernels_cuda/naive/naive.cu").read_text().splitlines()
    at = next(i for i, line in enumerate(src) if "@tunable" in line)
    pads = [f"#define AVO_TEST_PAD{i} 0  // @tunable 0 1 2 3 4 5 6 7" for i in range(3)]
    path = tmp_path_factory.mktemp("seed") / "padded.cu"
    path.write_text("\n".join(src[:at + 1] + pads + src[at + 1:]) + "\n")
    return path


def base(seed: Path, tmp: Path, *extra: str) -> list[str]:
    return ["agent=mutation", "kernel=gqa", "harness=compile", f"seed={seed}", f"harness.cache_dir={tmp}/cache",
            f"search.attempts_per_step={ATTEMPTS}", "launcher=slurm", "launcher.cpus_per_task=1",
            "launcher.mem_gb=1", "launcher.timeout_min=10", "launcher.signal_delay_s=30", "launcher.poll_s=1",
            # paths and launcher settings stay out of the sweep's run directory names
            "hydra.job.config.override_dirname.exclude_keys=[resume,search.max_steps,search.max_hours,seed,"
            "harness.cache_dir,launcher,launcher.cpus_per_task,launcher.mem_gb,launcher.timeout_min,"
            "launcher.signal_delay_s,launcher.poll_s,launcher.gpus_per_node,launcher.wait]",
            *extra]


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avo.launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "slurm" / "job.json").read_text())


def state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=30).stdout.split()
    return out[0].split()[0] if out else "UNKNOWN"


def wait_done(job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = state(job_id)
        if s in DONE:
            return s
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {state(job_id)} after {timeout:.0f} s")


def wait_for(what: str, pred, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def parts(run_dir: Path) -> int:
    return len(lineage.read_run(run_dir)) if (run_dir / "lineage").exists() else 0


def check_lineage(run_dir: Path, steps: int | None) -> pl.DataFrame:
    """One run id, every step 0..steps present with all its attempts, no candidate twice.

    steps=None: a wall-clock budget ended the run, so the last step may be cut short."""
    df = lineage.read_run(run_dir)
    assert df["run_id"].n_unique() == 1
    assert df["candidate_id"].n_unique() == len(df)
    per_step = dict(df.group_by("step").len().iter_rows())
    if steps is None:
        steps = max(per_step)
        assert 1 <= per_step[steps] <= ATTEMPTS, per_step
        per_step[steps] = ATTEMPTS
    assert per_step == {0: 1, **{s: ATTEMPTS for s in range(1, steps + 1)}}, per_step
    return df


def log_text(run_dir: Path) -> str:
    rec = record(run_dir)
    return Path(rec["stdout"].replace("%j", rec["job_id"])).read_text() + \
        Path(rec["stderr"].replace("%j", rec["job_id"])).read_text()


def test_sweep_submits_one_job_per_combination_and_returns(seed, tmp_path):
    sweep = tmp_path / "sweep"
    t = time.monotonic()
    p = launch("-m", *base(seed, tmp_path, "group=4,8", "search.max_steps=3", "launcher.gpus_per_node=1",
                           f"hydra.sweep.dir={sweep}"))
    submit_s = time.monotonic() - t
    assert p.returncode == 0, p.stderr[-3000:]
    assert submit_s < 30, f"submitting took {submit_s:.0f} s: the launcher waited for the jobs"
    runs = sorted(r.parent.parent for r in sweep.glob("*/slurm/job.json"))
    assert [r.name.split("group=")[1].split(",")[0] for r in runs] == ["4", "8"]
    for run in runs:
        rec = record(run)
        assert rec["run_dir"] == str(run) and f"submitted job {rec['job_id']}" in p.stdout
        assert f"group={run.name.split('group=')[1].split(',')[0]}" in rec["name"]
        assert wait_done(rec["job_id"], 240) == "COMPLETED", log_text(run)[-3000:]
    for run, group in zip(runs, (4, 8), strict=True):
        df = check_lineage(run, 3)
        assert set(df["heads_kv"]) == {32 // group}
        info = json.loads((run / "run.json").read_text())
        assert f"group={group}" in info["overrides"]
        assert ": harness=compile times on none" in log_text(run)  # the job got a gpu GRES, left to no one


def test_time_limit_warning_checkpoints_requeues_and_resumes(seed, tmp_path):
    run = tmp_path / "run"
    # The warning comes at most 35 s into each 1-minute job (Slurm may send it up to a minute early), and
    # a budget of 45 s of attempts summed over restarts cannot run out before it, however fast the machine.
    p = launch(*base(seed, tmp_path, "group=4", "search.max_steps=1000", f"search.max_hours={45 / 3600}",
                     "launcher.timeout_min=1", "launcher.signal_delay_s=25", f"hydra.run.dir={run}"))
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = record(run)["job_id"]
    assert wait_done(job_id, 300) == "COMPLETED", log_text(run)[-3000:]
    log = log_text(run)
    assert "Caught signal SIGUSR2" in log and "checkpoint: requeueing" in log
    starts = [ln for ln in log.splitlines() if ln.startswith(f"[avo.launcher] search job {job_id} ")]
    assert len(starts) >= 2 and "(restart 1)" in starts[1], starts
    assert "reached search.max_hours" in log
    check_lineage(run, None)


def test_preempted_job_requeues_and_resumes_without_loss_or_duplicates(seed, tmp_path):
    run = tmp_path / "run"
    args = base(seed, tmp_path, "group=8", "search.max_steps=20", f"hydra.run.dir={run}")
    assert launch(*args).returncode == 0
    job_id = record(run)["job_id"]
    wait_for("a few attempts", lambda: parts(run) >= 6)
    busy = launch(*args)  # a second job for a run dir with a live job is refused
    assert busy.returncode == 2 and f"already has Slurm job {job_id} (RUNNING)" in busy.stderr
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_done(job_id, 300) == "COMPLETED", log_text(run)[-3000:]
    assert "(restart 1)" in log_text(run)
    check_lineage(run, 20)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if d.name.isdigit() and text in cmd and int(d.name) != os.getpid():
            found.append(f"{d.name}: {cmd}")
    return found


def test_hard_killed_job_leaves_no_workers_and_a_new_job_resumes(seed, tmp_path):
    run = tmp_path / "run"
    budget = 60  # far more than runs before the kill, so the kill always lands mid-run
    args = base(seed, tmp_path, "group=4", f"search.max_steps={budget}", f"hydra.run.dir={run}")
    assert launch(*args).returncode == 0
    job_id = record(run)["job_id"]
    wait_for("a running harness worker", lambda: parts(run) >= 3 and any(
        "avo.harness.worker" in p for p in _processes_mentioning(str(run))))
    subprocess.run(["scancel", "--signal=KILL", "--full", job_id], check=True)
    assert wait_done(job_id, 60) in {"CANCELLED", "FAILED"}
    # sacct says CANCELLED at once; the step's processes are killed by KillWait (10 s) at the latest
    wait_for("the job to leave the node", lambda: subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True,
                                                                   text=True).stdout.strip() == "", timeout=60)
    assert _processes_mentioning(str(run)) == []  # the job's search and harness workers are gone
    killed = lineage.read_run(run)
    assert 3 <= len(killed) < 1 + budget * ATTEMPTS
    last = int(killed["step"].max())

    p = launch(*base(seed, tmp_path, "group=4", f"search.max_steps={last + 2}", f"resume={run}",
                     "launcher.wait=true", f"hydra.run.dir={tmp_path}/other"), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    check_lineage(run, last + 2)
    # the same overrides (same run dir) with a larger budget continue the same run
    p = launch(*args[:-2], f"search.max_steps={last + 3}", "launcher.wait=true", f"hydra.run.dir={run}",
               timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    check_lineage(run, last + 3)


@pytest.mark.parametrize("extra, message", [
    ("launcher.partition=nosuchpartition",
     "launcher.partition=nosuchpartition: Slurm says 'Invalid partition name specified'"),
    ("launcher.gpus_per_node=64", "can ever run this job (Requested node configuration is not available): lower "
                                  "launcher.gpus_per_node=64 (a node has at most "),
    ("launcher.cpus_per_task=4096", "lower launcher.cpus_per_task=4096 (a node has at most "),
    ("launcher.mem_gb=100000", "lower launcher.mem_gb=100000 (a node has at most "),
    ("launcher.constraint=nosuchfeature", "(Invalid feature specification); check launcher.account, qos, constraint"),
])
def test_a_job_slurm_would_never_start_is_refused_with_the_setting_to_change(seed, tmp_path, extra, message):
    before = _job_ids()
    p = launch(*base(seed, tmp_path, extra, f"hydra.run.dir={tmp_path}/run"), timeout=60)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("avo: error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert "Traceback" not in p.stderr and "submitted" not in p.stdout
    assert not (tmp_path / "run" / "slurm" / "job.json").exists() and not _job_ids() - before  # nothing submitted


def test_a_search_asks_for_its_harness_gpus_and_more_than_a_node_has_is_refused(seed, tmp_path):
    """harness.devices sets the job's GPU request (launcher.gpus_per_node=0); this node has 2 gpu GRES."""
    gpu = [a for a in base(seed, tmp_path, "group=4") if a != "harness=compile"] + ["harness=gpu"]
    before = _job_ids()
    for extra, message in (
            (["harness.devices=[0,1,2]"], "no node of the default partition can ever run this job (Requested node "
                                          "configuration is not available): lower harness.devices=[0,1,2] (3 GPUs) "
                                          "(a node has at most 2)"),
            (["harness.devices=[0,1]", "launcher.gpus_per_node=1"],
             "launcher.gpus_per_node=1 is fewer than the 2 GPUs harness.devices=[0,1] use")):
        p = launch(*gpu, *extra, f"hydra.run.dir={tmp_path}/no", timeout=60)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("avo: error:")]
        assert p.returncode == 2 and len(errors) == 1 and message in errors[0], p.stderr
    assert not _job_ids() - before and not (tmp_path / "no" / "slurm" / "job.json").exists()

    run = tmp_path / "run"
    p = launch(*gpu, "harness.devices=[0,1]", f"hydra.run.dir={run}", timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = record(run)["job_id"]
    subprocess.run(["scancel", job_id], check=True)  # no GPU behind the GRES: the request is what is tested
    assert "#SBATCH --gpus-per-node=2" in (run / "slurm" / f"{job_id}_submission.sh").read_text()


def _job_ids() -> set[str]:
    """Jobs in the queue now; compare by difference, since an earlier test's job may end meanwhile."""
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split())


def _node() -> dict:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%m|%P"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    name, cpus, mem, _ = next(line.split("|") for line in out if line.split("|")[3].endswith("*"))
    return {"name": name, "cpus": int(cpus), "mem_mb": int(mem)}


def test_the_default_request_is_refused_where_no_node_is_that_large(tmp_path):
    """The command of a first try on the one-machine cluster, with the launcher's defaults (8 CPUs, 64 GB)."""
    node = _node()
    too_big = [s for s, over in (("launcher.cpus_per_task=8", node["cpus"] < 8),
                                 ("launcher.mem_gb=64", node["mem_mb"] < 64 * 1024)) if over]
    if not too_big:
        pytest.skip(f"this node ({node['cpus']} CPUs, {node['mem_mb']} MB) can run the default request")
    before = _job_ids()
    p = launch("-m", "launcher=slurm", "harness=compile", "agent=mutation", "kernel=gqa", "group=4,8",
               f"hydra.sweep.dir={tmp_path}/sweep", timeout=120)
    assert p.returncode == 2 and not _job_ids() - before
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("avo: error:")]
    assert len(errors) == 1 and all(f"{s} (a node has at most" in errors[0] for s in too_big), p.stderr


def _documented_sweep() -> list[str]:
    """The launch command of slurm/README.md's quick start, continuation lines joined."""
    text = (ROOT / "slurm" / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = block.replace("\\\n", " ").splitlines()
    line = next(ln for ln in command if ln.startswith("python -m avo.launch"))
    return shlex.split(line.split("#", 1)[0])[3:]


def test_the_documented_one_machine_sweep_runs_as_written(tmp_path):
    args = _documented_sweep()
    assert "launcher=slurm" in args and "group=4,8" in args
    sweep = tmp_path / "sweep"
    p = launch(*args, f"hydra.sweep.dir={sweep}", timeout=120)  # only where the outputs go is added
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(r.parent.parent for r in sweep.glob("*/slurm/job.json"))
    assert [r.name for r in runs] == [f"agent=mutation,group={g},harness=compile,kernel=gqa,search=smoke"
                                      for g in (4, 8)]
    for run in runs:
        assert wait_done(record(run)["job_id"], 300) == "COMPLETED", log_text(run)[-3000:]
        assert len(lineage.read_run(run)) >= 2


def test_a_request_that_fits_a_drained_node_is_submitted_and_waits(seed, tmp_path):
    node = _node()["name"]
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=avo test"], check=True)
    try:
        p = launch(*base(seed, tmp_path, "group=4", "search.max_steps=1", f"hydra.run.dir={tmp_path}/run"))
        assert p.returncode == 0, p.stderr[-3000:]
        assert "though a node fits the request (down or drained now?): submitting" in p.stdout
        job_id = record(tmp_path / "run")["job_id"]
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        assert queued.stdout.strip() == "PENDING"
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=True)
    assert wait_done(job_id, 240) == "COMPLETED", log_text(tmp_path / "run")[-3000:]


def test_server_that_never_becomes_healthy_fails_its_job_clearly(tmp_path):
    hung = tmp_path / "hung-python"
    hung.write_text("#!/bin/sh\nexec sleep 600\n")  # accepts the vLLM command line and never serves
    hung.chmod(0o755)
    url_file = tmp_path / "servers" / "smollm.url"
    p = launch("agent=smollm", f"agent.server.python={hung}", "agent.server.start_timeout_s=5", "launcher=slurm",
               "launcher.job=server", f"launcher.server_url_file={url_file}", "launcher.cpus_per_task=1",
               "launcher.mem_gb=1", "launcher.timeout_min=5", "launcher.signal_delay_s=30", "launcher.wait=true",
               "launcher.poll_s=1", "harness=compile", timeout=180)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("avo: error:")]
    assert len(errors) == 1, p.stderr
    assert "failed: LaunchError: model server" in errors[0] and "did not become healthy" in errors[0]
    assert not url_file.exists()


def test_search_waiting_for_an_unpublished_server_gives_up_clearly(tmp_path):
    p = launch("agent=smollm", "agent.server.mode=external", f"agent.server.url_file={tmp_path}/none.url",
               "agent.server.url_wait_s=3", "launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1",
               "launcher.timeout_min=5", "launcher.signal_delay_s=30", "launcher.wait=true", "launcher.poll_s=1",
               "harness=compile", "kernel=gqa", "group=4", "seed=naive", f"hydra.run.dir={tmp_path}/run",
               timeout=180)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("avo: error:")]
    assert len(errors) == 1 and "did not appear" in errors[0], p.stderr


def test_max_parallel_runs_a_sweep_one_lane_at_a_time(seed, tmp_path):
    sweep = tmp_path / "sweep"
    p = launch("-m", *base(seed, tmp_path, "group=2,4,8", "search.max_steps=1", "launcher.max_parallel=1",
                           f"hydra.sweep.dir={sweep}"))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [record(r.parent.parent) for r in sorted(sweep.glob("*/slurm/job.json"))]
    assert len(recs) == 3 and {r["name"] for r in recs} == {f"avo.{sweep.name}.lane0"}
    for r in recs:
        assert wait_done(r["job_id"], 240) == "COMPLETED"
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(r["job_id"] for r in recs), "-o", "Start,End"],
                         capture_output=True, text=True, check=True).stdout.split()
    spans = sorted(tuple(line.split("|")) for line in out)
    assert all(spans[i][0] >= spans[i - 1][1] for i in range(1, len(spans))), spans  # never two at once


def test_hand_written_search_sbatch_runs_a_search(seed, tmp_path):
    run = tmp_path / "run"
    overrides = [a for a in base(seed, tmp_path, "group=4", "search.max_steps=2")
                 if not a.startswith(("launcher", "hydra"))]
    p = subprocess.run(["sbatch", "--parsable", "--mem=1G", "--cpus-per-task=1", "--time=5", "--gpus-per-node=1",
                        f"--output={tmp_path}/%j.out", "slurm/search.sbatch", *overrides], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "AVO_RUN_DIR": str(run)})
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    assert wait_done(job_id, 240) == "COMPLETED", (tmp_path / f"{job_id}.out").read_text()[-3000:]
    assert ": harness=compile times on none" in (tmp_path / f"{job_id}.out").read_text()
    check_lineage(run, 2)
