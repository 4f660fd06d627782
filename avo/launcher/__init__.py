"""Where a job runs: in this process (launcher=local) or as a Slurm job (launcher=slurm).

Two kinds of job (launcher.job): `search` runs (or resumes) one search; `server` serves the agent's
model with vLLM and publishes its URL for search jobs that use agent.server.mode=external.
"""
from __future__ import annotations

from avo.launcher.job import LaunchError, RunDirBusy

__all__ = ["launch", "LaunchError", "RunDirBusy"]


def check(cfg) -> None:
    """The launcher group's rules (avo.config.validate runs them before anything is written or submitted)."""
    L = cfg.launcher
    if L.name not in ("local", "slurm"):
        raise LaunchError(f"launcher={L.name!r}: use local or slurm")
    if L.job not in ("search", "server"):
        raise LaunchError(f"launcher.job={L.job!r}: use search or server")
    if L.job == "server" and (cfg.agent.kind != "llm" or cfg.agent.server.mode != "managed"):
        raise LaunchError(f"launcher.job=server starts vLLM for an LLM agent's model: agent={cfg.agent.name} is kind "
                          f"{cfg.agent.kind!r}" + (f" with agent.server.mode={cfg.agent.server.mode}"
                                                   if cfg.agent.kind == "llm" else "")
                          + " (choose an agent with kind llm and leave agent.server.mode=managed; searches that use "
                            "the server take mode=external)")
    if L.name == "slurm" and L.signal_delay_s + 30 >= L.timeout_min * 60:
        raise LaunchError(f"launcher.signal_delay_s={L.signal_delay_s} leaves no time to run within "
                          f"launcher.timeout_min={L.timeout_min}; keep the delay + 30 s well under the limit")


def launch(cfg):
    name = cfg.launcher.name
    if name == "local":
        from avo.launcher.local import run_local

        return run_local(cfg)
    if name == "slurm":
        from avo.launcher.slurm import submit

        return submit(cfg)
    raise LaunchError(f"launcher={name!r}: use local or slurm")  # (validate said so before anything ran)
