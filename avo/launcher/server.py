"""A model server as a job of its own: vLLM on all of the job's GPUs, its base URL published in a file.

Search jobs point at it with agent.server.mode=external agent.server.url_file=<that file>; they wait
for the file and for /health (agent.server.url_wait_s). The file appears, atomically, only once the
server answers /health, and is removed when the server stops, so a reader never sees a dead address.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from omegaconf import DictConfig

from avo.errors import LaunchError
from avo.fsutil import atomic_write_text
from avo.progress import launcher_log as log


def _public_server(cfg: DictConfig, log_dir: Path):
    from avo.agent.server import ManagedVllm

    class PublicVllm(ManagedVllm):
        """The managed vLLM of the agent, listening on every interface instead of 127.0.0.1."""

        def command(self, port: int) -> list[str]:
            cmd = super().command(port)
            cmd[cmd.index("--host") + 1] = "0.0.0.0"
            return cmd

    server_cfg = cfg.agent.server
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if gpus and not server_cfg.gpus:
        server_cfg.gpus = [int(g) if g.isdigit() else g for g in gpus]
    return PublicVllm(server_cfg, cfg.agent.model, log_dir)


def serve(cfg: DictConfig, url_file: Path) -> dict:
    """Start vLLM, publish http://<this host>:<port>/v1 in url_file, and keep it alive until the job ends."""
    from avo.agent.server import ServerError

    log_dir = url_file.parent / f"{url_file.stem}.logs"
    server = _public_server(cfg, log_dir)
    host = public_host()
    mine = ""
    try:
        server.start()  # raises ServerError when vLLM exits or never answers /health
        mine = f"http://{host}:{server.port}/v1"
        atomic_write_text(url_file, mine + "\n")
        log(f"serving {cfg.agent.model} at {mine}; published in {url_file}")
        t0 = time.monotonic()
        while True:
            time.sleep(10.0)
            if not server.alive():
                _unpublish(url_file, mine)
                server.ensure_alive()  # restarts with back-off, or raises after max_restarts
                mine = f"http://{host}:{server.port}/v1"
                atomic_write_text(url_file, mine + "\n")
                log(f"restarted; serving at {mine} ({(time.monotonic() - t0) / 3600:.1f} h up)")
    except ServerError as e:
        raise LaunchError(f"model server for {cfg.agent.model}: {e}") from None
    finally:
        _unpublish(url_file, mine)
        server.stop()


def public_host() -> str:
    """A name other nodes can reach this one by: the FQDN unless it is a loopback name, else the hostname."""
    for name in (socket.getfqdn(), os.environ.get("SLURMD_NODENAME", ""), socket.gethostname()):
        if name and not name.startswith(("localhost", "127.", "::1", "ip6-localhost")):
            return name
    raise LaunchError("this node has no name but localhost; other jobs could not reach its model server")


def _unpublish(url_file: Path, mine: str) -> None:
    """Remove the address file only if it still holds this server's address."""
    try:
        if mine and url_file.read_text().strip() == mine:
            url_file.unlink()
    except FileNotFoundError:
        pass
