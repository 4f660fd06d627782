"""Server lifecycle failures with real processes: no vLLM needed, none of them may hang."""
import os
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from omegaconf import OmegaConf

from avo.agent.server import External, ManagedVllm, ServerError, free_port, healthy, make_server
from avo.config import LlmServerConf


def conf(**kw):
    return OmegaConf.merge(OmegaConf.structured(LlmServerConf), kw)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_server_that_exits_at_start_is_one_clear_error(tmp_path):
    # the test interpreter has no vLLM: the module is missing and the process exits at once
    s = ManagedVllm(conf(python=sys.executable, start_timeout_s=60), "m", tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 1 before becoming healthy") as e:
        s.start()
    assert time.monotonic() - t0 < 30 and "vllm" in str(e.value)
    assert "vllm.entrypoints.openai.api_server" in (tmp_path / "vllm.log").read_text()


def test_a_server_that_never_becomes_healthy_is_killed(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 300 &\nsleep 300\n")  # a child too: the whole group must die
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    s = ManagedVllm(conf(python=str(fake), start_timeout_s=3), "m", tmp_path)
    procs = []
    orig = ManagedVllm._wait_healthy

    def spy(self):
        procs.append(self.proc.pid)
        return orig(self)
    ManagedVllm._wait_healthy = spy
    try:
        with pytest.raises(ServerError, match="did not become healthy within agent.server.start_timeout_s=3"):
            s.start()
    finally:
        ManagedVllm._wait_healthy = orig
    time.sleep(0.2)
    assert procs and not alive(procs[0]) and s.proc is None


def test_a_missing_interpreter_is_named(tmp_path):
    with pytest.raises(ServerError, match="agent.server.python"):
        ManagedVllm(conf(python=str(tmp_path / "nope")), "m", tmp_path).start()


def test_command_and_environment(tmp_path):
    s = ManagedVllm(conf(python="/venv/bin/python", model_path="/models/q", gpus=[2, 3], tensor_parallel_size=2,
                         extra_args=["--enforce-eager"], env={"X": "1"}), "qwen", tmp_path)
    cmd = s.command(8123)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/q" and cmd[cmd.index("--served-model-name") + 1] == "qwen"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--gpu-memory-utilization" in cmd
    assert cmd[-1] == "--enforce-eager" and "--enable-auto-tool-choice" in cmd
    env = s.env()
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["VLLM_HOST_IP"] == "127.0.0.1" and env["X"] == "1"


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_external_url_file_is_waited_for(tmp_path):
    port = free_port()
    httpd = HTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url_file = tmp_path / "url"
    try:
        threading.Timer(1.0, lambda: url_file.write_text(f"http://127.0.0.1:{port}/v1\n")).start()
        ext = make_server(conf(mode="external", url_file=str(url_file), url_wait_s=20), "m", tmp_path)
        assert ext.start() == f"http://127.0.0.1:{port}/v1"
        assert healthy(ext.base_url)
    finally:
        httpd.shutdown()


def test_external_failures_do_not_hang(tmp_path):
    with pytest.raises(ServerError, match="did not appear"):
        External(conf(mode="external", url_file=str(tmp_path / "never"), url_wait_s=1)).start()
    with pytest.raises(ServerError, match="did not answer"):
        External(conf(mode="external", base_url=f"http://127.0.0.1:{free_port()}/v1", url_wait_s=1)).start()
    with pytest.raises(ServerError, match="needs agent.server.base_url"):
        External(conf(mode="external")).start()
    with pytest.raises(ServerError, match="managed or external"):
        make_server(conf(mode="cloud"), "m", tmp_path)


HEALTH_SERVER = """#!{python}
# stands in for `python -m vllm...`: answers /health on the --port it is given
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_a_dead_server_is_restarted_then_given_up_on(tmp_path):
    exe = tmp_path / "python"
    exe.write_text(HEALTH_SERVER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    s = ManagedVllm(conf(python=str(exe), start_timeout_s=30, max_restarts=1), "m", tmp_path)
    s.start()
    try:
        first = s.proc.pid
        s.ensure_alive()  # alive: nothing happens
        assert s.proc.pid == first and s.restarts == 0
        os.killpg(first, 9)
        s.proc.wait()
        s.ensure_alive()
        assert s.restarts == 1 and s.proc.pid != first and healthy(s.base_url)
        os.killpg(s.proc.pid, 9)
        s.proc.wait()
        with pytest.raises(ServerError, match="max_restarts=1 restarts are used up"):
            s.ensure_alive()
    finally:
        s.stop()
    assert s.proc is None


def test_workers_that_find_the_server_dead_restart_it_once_on_the_same_url(tmp_path):
    exe = tmp_path / "python"
    exe.write_text(HEALTH_SERVER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    s = ManagedVllm(conf(python=str(exe), start_timeout_s=30, max_restarts=3), "m", tmp_path)
    url = s.start()
    try:
        os.killpg(s.proc.pid, 9)
        s.proc.wait()
        threads = [threading.Thread(target=s.ensure_alive) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.restarts == 1 and s.base_url == url and healthy(url)
    finally:
        s.stop()
