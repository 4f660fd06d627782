"""The launcher's pure logic and its errors that need no cluster: job names, GPU split, run lock, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from avo.config import register, validate
from avo.errors import ConfigError
from avo.launcher.job import RunDirBusy, SearchJob, place_gpus, run_lock
from avo.launcher.slurm import job_name

ROOT = Path(__file__).resolve().parents[1]


def compose_with_hydra(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    hydra = cfg.hydra
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    cfg.run_dir = "/tmp/unused"
    return cfg, hydra


def test_slurm_launcher_config_composes_with_its_schema():
    cfg, _ = compose_with_hydra("launcher=slurm", "launcher.partition=gpu", "launcher.gpus_per_node=4")
    validate(cfg)
    L = cfg.launcher
    assert (L.name, L.job, L.partition, L.gpus_per_node, L.wait) == ("slurm", "search", "gpu", 4, False)
    assert L.server_url_file == "outputs/servers/mutation.url"
    with pytest.raises(Exception, match="no_such_key"):
        compose_with_hydra("launcher=slurm", "launcher.no_such_key=1")


def test_job_name_follows_the_sweep_overrides_without_launcher_keys():
    cfg, hydra = compose_with_hydra("kernel=gqa", "group=8", "launcher=slurm", "launcher.timeout_min=60",
                                    "resume=/x", "search.max_steps=5", "harness=compile")
    assert job_name(cfg, hydra) == "avo.group=8,harness=compile,kernel=gqa"
    assert job_name(cfg, None) == "avo.gqa.g8.mutation"


def test_a_managed_server_gets_the_jobs_gpus_the_harness_does_not_time_on(monkeypatch, capsys):
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    cfg, _ = compose_with_hydra("agent=smollm", "harness.devices=[1,3]")
    place_gpus(cfg)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # the search sees them all: devices index them
    assert list(cfg.agent.server.gpus) == [4, 6]
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # nvidia-smi's numbering for every process of the job
    assert "GPUs 4,5,6,7: harness 5,7 (harness.devices=[1,3]), model server 4,6" in capsys.readouterr().out

    default, _ = compose_with_hydra("agent=smollm")  # harness.device=0: the job's first GPU
    place_gpus(default)
    assert list(default.agent.server.gpus) == [5, 6, 7]

    compile_only, _ = compose_with_hydra("agent=smollm", "harness=compile")  # times nothing: the server gets all
    place_gpus(compile_only)
    assert list(compile_only.agent.server.gpus) == [4, 5, 6, 7]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    full, _ = compose_with_hydra("agent=smollm", "harness.devices=[0,1]")
    place_gpus(full)
    assert list(full.agent.server.gpus) == [] and "model server: none left, so it shares them" in \
        capsys.readouterr().out

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # a user's choice stays
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    place_gpus(cfg)  # no GPUs allocated: nothing is set
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_a_server_gpu_the_harness_times_on_is_refused_against_the_jobs_own_gpus(monkeypatch):
    """agent.server.gpus are CUDA_VISIBLE_DEVICES entries, harness.devices indices into them."""
    cfg, _ = compose_with_hydra("agent=qwen", "harness.devices=[0]")  # the server has [1, 2]
    validate(cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4")  # in this job, index 0 is GPU 2
    with pytest.raises(ConfigError, match=r"harness.devices=\[0\] and agent.server.gpus=\[1,2\] share GPU 2"):
        place_gpus(cfg)


def test_run_lock_is_exclusive_and_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from avo.launcher.job import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f'"pid": {holder.pid}'):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # SIGKILL left no stale lock
        pass


def test_search_job_pickles_a_resolved_config_with_an_absolute_run_dir(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    cfg, hydra = compose_with_hydra("kernel=gqa", "group=4")
    cfg.run_dir = "relative/run"
    job = pickle.loads(pickle.dumps(SearchJob(cfg, hydra)))
    assert job.cfg.run_dir == str(tmp_path / "relative" / "run")
    assert job.cfg.kernel.heads_kv == 8  # interpolations resolved before the job leaves this process
    again = job.checkpoint()
    assert again.function is job and again.args == ()


def _launch(*args: str, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avo.launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_missing_sbatch_is_one_clear_error(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no Slurm client
    t = time.monotonic()
    p = _launch("launcher=slurm", "harness=compile", f"hydra.run.dir={tmp_path}/run", env=env)
    assert p.returncode == 2 and time.monotonic() - t < 30
    assert "avo: error: launcher=slurm: `sbatch`/`srun` are not on PATH" in p.stderr
    assert "Traceback" not in p.stderr


def test_signal_delay_must_leave_time_to_run(tmp_path):
    p = _launch("launcher=slurm", "launcher.timeout_min=1", "launcher.signal_delay_s=45", "harness=compile",
                f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 2
    assert "launcher.signal_delay_s=45 leaves no time to run within launcher.timeout_min=1" in p.stderr


def test_unknown_launcher_job_kind(tmp_path):
    p = _launch("launcher=local", "launcher.job=train", "harness=compile", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 2 and "launcher.job='train': use search or server" in p.stderr


def test_local_launcher_runs_the_same_job_function_in_process(tmp_path):
    run = tmp_path / "run"
    p = _launch("launcher=local", "agent=mutation", "kernel=gqa", "group=4", "harness=compile", "seed=naive",
                "search.max_steps=1", "search.attempts_per_step=1", f"harness.cache_dir={tmp_path}/cache",
                f"hydra.run.dir={run}", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[avo.launcher] search job on " in p.stdout and str(run) in p.stdout
    from avo import lineage

    assert (run / "run.json").exists() and lineage.read_run(run)["candidate_id"].to_list() == ["00000.00", "00001.00"]


@pytest.mark.parametrize("limit, minutes", [("infinite", None), ("UNLIMITED", None), ("30", 30), ("30:00", 30),
                                            ("0:30", 1), ("2:00:00", 120), ("1-00:00:00", 1440),
                                            ("2-01:30:00", 2970)])
def test_sinfo_time_limits_read_as_minutes(limit, minutes):
    from avo.launcher.slurm import _minutes

    assert _minutes(limit) == minutes
