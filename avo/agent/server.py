"""Where the LLM is served: a vLLM process this run manages, or an external OpenAI-compatible endpoint.

managed: `<python> -m vllm.entrypoints.openai.api_server` in its own process group on 127.0.0.1 and a free
port, pinned to its own GPUs, health-checked with a deadline, logged to <run_dir>/agent/vllm.log, restarted
with back-off if it dies, and killed (the whole group) on close.
external: a base URL, given or published in a file by a long-lived server job.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from avo.errors import ServerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base_url: str, timeout_s: float = 5.0) -> bool:
    """vLLM answers GET /health at the server root; other endpoints answer GET /v1/models."""
    root = base_url.rstrip("/").removesuffix("/v1")
    for url in (f"{root}/health", f"{base_url.rstrip('/')}/models"):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return False


def _log(msg: str) -> None:
    print(f"[avo.agent] {msg}", flush=True)


class ManagedVllm:
    def __init__(self, cfg, model: str, log_dir: Path, api_key: str = ""):
        self.cfg, self.model, self.api_key = cfg, model, api_key
        self.log_path = Path(log_dir) / "vllm.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0
        self._restart_lock = threading.Lock()  # search.workers share the server: one restart, not K

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self, port: int) -> list[str]:
        c = self.cfg
        cmd = [c.python, "-m", "vllm.entrypoints.openai.api_server", "--model", c.model_path or self.model,
               "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(port),
               "--tensor-parallel-size", str(c.tensor_parallel_size), "--max-model-len", str(c.max_model_len),
               "--dtype", c.dtype, "--enable-auto-tool-choice", "--tool-call-parser", c.tool_call_parser]
        if c.gpus:
            cmd += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if c.get("max_num_seqs"):  # search.workers conversations share the server: its batch limit
            cmd += ["--max-num-seqs", str(c.max_num_seqs)]
        return cmd + [str(a) for a in c.extra_args]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", **{k: str(v) for k, v in self.cfg.env.items()}}
        if self.cfg.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.cfg.gpus)
        return env

    def start(self) -> str:
        # a restart keeps its port: every client (all of search.workers') holds this base URL
        self.port = self.cfg.port or self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(self.port)
        gpus = ",".join(map(str, self.cfg.gpus)) or "unset"
        _log(f"starting vLLM for {self.model} on {self.base_url} (CUDA_VISIBLE_DEVICES={gpus}); log {self.log_path}")
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, env=self.env())
                log.write(f"==== process group {self.proc.pid}\n".encode())  # to find strays by hand
                log.flush()
            except OSError as e:
                raise ServerError(f"cannot run {self.cfg.python!r} ({e}); set agent.server.python to the "
                                  "interpreter of the environment vLLM is installed in") from None
        self._wait_healthy()
        return self.base_url

    def _wait_healthy(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.start_timeout_s
        next_note = t0 + 30
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()  # the leader is gone; its group may not be
                raise ServerError(f"vLLM exited with code {rc} before becoming healthy; last log lines:\n"
                                  f"{self.log_tail()}")
            if healthy(self.base_url, timeout_s=2.0):
                _log(f"vLLM healthy after {time.monotonic() - t0:.0f} s")
                return
            if time.monotonic() >= next_note:
                _log(f"waiting for vLLM /health ({time.monotonic() - t0:.0f} s of {self.cfg.start_timeout_s:.0f})")
                next_note += 30
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"vLLM did not become healthy within agent.server.start_timeout_s="
                          f"{self.cfg.start_timeout_s:.0f} s; stopped it. Last log lines:\n{tail}")

    @property
    def _rc(self):
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_alive(self) -> None:
        """Called before a retry: restart a dead server (with back-off), up to max_restarts times."""
        with self._restart_lock:
            self._ensure_alive()

    def _ensure_alive(self) -> None:
        if self.alive():
            return
        if self.restarts >= self.cfg.max_restarts:
            raise ServerError(f"vLLM died and agent.server.max_restarts={self.cfg.max_restarts} restarts are "
                              f"used up; see {self.log_path}")
        self.restarts += 1
        wait = min(5.0 * 2 ** (self.restarts - 1), 120.0)
        _log(f"vLLM is not running (exit code {self._rc}); restart {self.restarts}/{self.cfg.max_restarts} "
             f"in {wait:.0f} s")
        self.stop()
        time.sleep(wait)
        self.start()

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left; vLLM's engine workers are in the group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                # the leader is gone; make sure no member of its group survives it
                os.killpg(proc.pid, signal.SIGKILL)
            except subprocess.TimeoutExpired:
                continue
            except (ProcessLookupError, PermissionError):
                pass
            break
        # SIGKILLed members take a moment to exit (unmapping gigabytes); return once they have
        deadline = time.monotonic() + 10.0
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _group_members(proc.pid)
        _log("vLLM stopped" if not left else f"vLLM stopped; pids {left} of its group are still exiting")


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


class External:
    """An endpoint someone else runs; nothing to start or stop."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.base_url = ""

    def start(self) -> str:
        c = self.cfg
        if c.base_url:
            self.base_url = c.base_url
        elif c.url_file:
            self.base_url = self._read_url_file(Path(c.url_file).expanduser(), c.url_wait_s)
        else:
            raise ServerError("agent.server.mode=external needs agent.server.base_url or agent.server.url_file")
        deadline = time.monotonic() + c.url_wait_s
        while not healthy(self.base_url):
            if time.monotonic() > deadline:
                raise ServerError(f"{self.base_url} did not answer /health or /models within "
                                  f"agent.server.url_wait_s={c.url_wait_s:.0f} s")
            time.sleep(2.0)
        _log(f"using the external endpoint {self.base_url}")
        return self.base_url

    @staticmethod
    def _read_url_file(path: Path, wait_s: float) -> str:
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                url = path.read_text().strip()
                if url:
                    return url
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"agent.server.url_file={path} did not appear (or stayed empty) within "
                                  f"agent.server.url_wait_s={wait_s:.0f} s; is the server job running?")
            if not announced:
                _log(f"waiting for a server to publish its URL in {path}")
                announced = True
            time.sleep(2.0)

    def ensure_alive(self) -> None:
        pass

    def stop(self) -> None:
        pass


def make_server(cfg, model: str, log_dir: Path, api_key: str = ""):
    if cfg.mode == "managed":
        return ManagedVllm(cfg, model, log_dir, api_key)
    if cfg.mode == "external":
        return External(cfg)
    raise ServerError(f"agent.server.mode={cfg.mode!r}: use managed or external")
