"""launcher=local: run the job function in this process (a sweep runs its jobs one after another)."""
from __future__ import annotations

from avo.launcher.job import SearchJob, ServerJob, current_hydra


def run_local(cfg):
    if cfg.launcher.job == "server":
        return ServerJob(cfg, cfg.launcher.server_url_file)()
    return SearchJob(cfg, current_hydra())()
