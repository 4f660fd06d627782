"""launcher=local: run the job function in this process (a sweep runs its jobs one after another)."""
from __future__ import annotations

from avo.launcher.job import SearchJob, ServerJob, current_hydra


def run_local(cfg):
    if cfg.launcher.get("job", "search") == "server":
        return ServerJob(cfg, cfg.launcher.server_url_file)()
    n = int(cfg.launcher.get("harness_gpus", 0) or 0)
    return SearchJob(cfg, current_hydra(), harness_gpus=n or None)()
