"""The job functions both launchers run: a search, or a model server for other searches.

They are submitit Checkpointables: on Slurm's warning signal or a preemption, submitit pickles the
same job (same config, same run directory) and requeues it; the search then resumes from its lineage.
Nothing but the lineage carries state across restarts, so a job killed hard resumes the same way.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from submitit.helpers import Checkpointable, DelayedSubmission

from avo import interrupt
from avo.config import register
from avo.errors import LaunchError, RunDirBusy  # noqa: F401 - LaunchError: part of this module's interface
from avo.fsutil import atomic_write_text
from avo.harness.devices import check_gpus, cuda_env, managed_server, setting, timing_gpus, visible_gpus
from avo.progress import launcher_log as log

LOCK = ".avo-run.lock"


def run_dir_of(cfg) -> Path:
    return Path(cfg.resume or cfg.run_dir).expanduser().resolve()


def job_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextmanager
def run_lock(run_dir: Path):
    """One live process per run directory. flock is dropped by the kernel when its holder dies, so a
    job killed hard never leaves a stale lock behind (on NFS this needs working lockd/NFSv4 locks)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{run_dir} is being run by another process ({holder}); wait for it to end "
                             "or cancel it before starting another job on this run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(job_identity()).encode(), 0)
        yield
    finally:
        os.close(fd)


def place_gpus(cfg: DictConfig) -> None:
    """Give a managed model server the job's GPUs that the harness does not time on.

    The harness's GPUs are harness.devices (avo.harness.devices), indices into the job's
    CUDA_VISIBLE_DEVICES, which the search process keeps whole: its workers are placed by index.
    A server with agent.server.gpus of its own keeps them, unless the harness times on one of this
    job's GPUs they name. Every process of the job numbers GPUs in PCI bus order, as nvidia-smi does.
    """
    os.environ.update(cuda_env())
    visible = visible_gpus()
    if not visible:
        return
    check_gpus(cfg, visible)  # against this job's GPUs, which the submitting host did not know
    timing = timing_gpus(cfg, visible)
    server_cfg = managed_server(cfg.agent)
    gave = ""
    if server_cfg is not None and not server_cfg.gpus:
        rest = [g for g in visible if g not in timing]
        if rest:
            server_cfg.gpus = [int(g) if g.isdigit() else g for g in rest]
            gave = f", model server {','.join(rest)}"
        else:
            gave = (", model server: none left, so it shares them (raise launcher.gpus_per_node to give it "
                    "GPUs of its own)")
    elif server_cfg is not None:
        gave = f", model server {','.join(str(g) for g in server_cfg.gpus)} (agent.server.gpus)"
    harness = f"harness {','.join(timing)} ({setting(cfg.harness)})" if timing else \
        f"harness={cfg.harness.name} times on none"
    log(f"GPUs {','.join(visible)}: {harness}{gave}")


def _restore_hydra(hydra_cfg: DictConfig | None) -> None:
    """Make HydraConfig.get() answer inside the job as it did at submission (run.json records overrides)."""
    if hydra_cfg is None:
        return
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        register()  # its resolvers (the sweep's folder name) are needed wherever hydra_cfg resolves
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))


def current_hydra() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


class SearchJob(Checkpointable):
    """Run or resume the search of one run directory (the same one after every requeue)."""

    def __init__(self, cfg: DictConfig, hydra_cfg: DictConfig | None = None):
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        self.cfg.run_dir = str(run_dir_of(cfg))
        self.hydra_cfg = hydra_cfg

    def __call__(self) -> dict:
        from avo.search import run_search

        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg))  # GPU placement edits a copy
        _restore_hydra(self.hydra_cfg)
        run_dir = Path(cfg.run_dir)
        jid = os.environ.get("SLURM_JOB_ID")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        log(f"search job{f' {jid}' if jid else ''} on {socket.gethostname()} (restart {restarts}): {run_dir}")
        place_gpus(cfg)
        try:
            with run_lock(run_dir), interrupt.on_signals():
                summary = run_search(cfg)
        except interrupt.Interrupted as e:  # recorded and cleaned up by the search: one line, the usual status
            log(f"search {e}: the attempt in flight is recorded as interrupted; the same command resumes {run_dir}")
            raise SystemExit(interrupt.exit_status(e)) from None
        return asdict(summary)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        # Everything the search needs is in its lineage on disk: requeue the same job as it was submitted.
        log(f"checkpoint: requeueing; the search resumes {self.cfg.run_dir} from its lineage")
        return DelayedSubmission(self, *args, **kwargs)


class ServerJob(Checkpointable):
    """Serve the agent's model with vLLM on this node and publish its base URL in a file."""

    def __init__(self, cfg: DictConfig, url_file: str | Path):
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        self.url_file = Path(url_file).expanduser().resolve()

    def __call__(self) -> dict:
        from avo.launcher.server import serve

        # scancel and preemption send SIGTERM first: unpublish the URL and stop vLLM before the SIGKILL
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        return serve(self.cfg, self.url_file)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        log(f"checkpoint: requeueing the model server; {self.url_file} is republished when it is healthy")
        return DelayedSubmission(self, *args, **kwargs)


def write_record(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str))
