"""Where a job runs: in this process (launcher=local) or as a Slurm job (launcher=slurm).

Two kinds of job (launcher.job): `search` runs (or resumes) one search; `server` serves the agent's
model with vLLM and publishes its URL for search jobs that use agent.server.mode=external.
"""
from __future__ import annotations

from avo.launcher.job import LaunchError, RunDirBusy

__all__ = ["launch", "LaunchError", "RunDirBusy"]


def launch(cfg):
    name, kind = cfg.launcher.name, cfg.launcher.get("job", "search")
    if kind not in ("search", "server"):
        raise LaunchError(f"launcher.job={kind!r}: use search or server")
    if name == "local":
        from avo.launcher.local import run_local

        return run_local(cfg)
    if name == "slurm":
        from avo.launcher.slurm import submit

        return submit(cfg)
    raise LaunchError(f"launcher={name!r}: use local or slurm")
