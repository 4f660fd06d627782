"""The workbench as an MCP server: streamable HTTP on 127.0.0.1, guarded by a token in the run directory.

The search (agent=external) serves its open step here from a background thread; every tool call goes to
avo.agent.desk, which runs the built-in agent's tool implementations and records them. For an agent that
starts its MCP servers itself,

    python -m avo.agent.mcp_server --run-dir <run dir>

is a stdio server that forwards to the running search's endpoint (avo.agent.mcp_stdio): the search owns
the step, the stdio process only relays, so both transports share one server, one desk and one record.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server

from avo.agent import render
from avo.agent.desk import Caller, StepDesk
from avo.config import ConfigError
from avo.fsutil import atomic_write_json, atomic_write_text

CLIENT_HEADER = "x-avo-client"      # the stdio relay passes on the name its own client declared
HEARTBEAT_S = 10.0                  # progress notifications while a tool runs (to clients that ask for them)


def endpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "agent" / "mcp.json"


def instructions() -> str:
    return render.text("system") + "\n" + render.text("external")


def version() -> str:
    """This package's version, as installed (a source checkout on PYTHONPATH has no metadata)."""
    try:
        return metadata.version("avo")
    except metadata.PackageNotFoundError:
        from avo import __version__

        return __version__


def server(on_list_tools, on_call_tool) -> Server:
    """The MCP server both transports present (the HTTP endpoint and the stdio relay)."""
    return Server("avo", version=version(), instructions=instructions(), on_list_tools=on_list_tools,
                  on_call_tool=on_call_tool)


async def with_heartbeat(ctx, name: str, work):
    """Await `work()` and, every HEARTBEAT_S until it returns, tell the client it is still running: a progress
    notification (sent only when the client's request carried a progress token) that keeps a client whose
    tool-call timeout restarts on progress from giving up on a benchmark or a wait for the next step."""
    async def beat():
        t0 = time.monotonic()
        while True:
            await anyio.sleep(HEARTBEAT_S)
            s = time.monotonic() - t0
            await ctx.session.report_progress(s, None, f"{name}: still running after {s:.0f} s")

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat)
        try:
            return await work()
        finally:
            tg.cancel_scope.cancel()


def build_server(desk: StepDesk, schemas: list[dict]) -> Server:
    tools = [types.Tool(name=s["function"]["name"], description=s["function"]["description"],
                        input_schema=s["function"]["parameters"]) for s in schemas]

    async def list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        who = caller(ctx)
        run = partial(desk.next_step, params.arguments, who) if params.name == "next_step" else \
            partial(desk.call, params.name, params.arguments, who)
        # tools block (the harness, the wait for a step): run them off the event loop
        r = await with_heartbeat(ctx, params.name, partial(anyio.to_thread.run_sync, run))
        return types.CallToolResult(content=[types.TextContent(type="text", text=r.text)], is_error=not r.ok)

    return server(list_tools, call_tool)


def caller(ctx) -> Caller:
    headers = getattr(ctx.request, "headers", None) or {}
    info = getattr(getattr(ctx.session, "client_params", None), "client_info", None)
    declared = f"{info.name} {info.version}".strip() if info is not None else ""
    return Caller(session=headers.get("mcp-session-id"), client=headers.get(CLIENT_HEADER) or declared)


class TokenGate:
    """ASGI middleware: every HTTP request carries `Authorization: Bearer <token>`; a DELETE ends a session."""

    def __init__(self, app, token: str, token_file: Path, on_session_end):
        self.app, self.expected = app, f"Bearer {token}".encode()
        self.token_file, self.on_session_end = token_file, on_session_end

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                body = json.dumps({"error": f"missing or wrong token: send 'Authorization: Bearer <token>' with "
                                            f"the token in {self.token_file}"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            if scope["method"] == "DELETE" and b"mcp-session-id" in headers:
                self.on_session_end(headers[b"mcp-session-id"].decode("latin-1"))
        await self.app(scope, receive, send)


class HttpEndpoint:
    """The MCP server in a background thread; `start` returns once it accepts connections."""

    def __init__(self, desk: StepDesk, schemas: list[dict], run_dir: Path, port: int = 0, token_file: str = ""):
        self.desk, self.schemas, self.run_dir, self.port = desk, schemas, Path(run_dir), port
        self.token_file = Path(token_file).expanduser() if token_file else self.run_dir / "agent" / "mcp.token"
        self.url = ""
        self._uv = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> str:
        import uvicorn

        logging.getLogger("mcp").setLevel(logging.WARNING)  # not a line per connection in the search's log
        token = secrets.token_urlsafe(32)
        # a fresh token per search process, never readable by other users
        atomic_write_text(self.token_file, token + "\n", mode=0o600)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))  # loopback only, whatever the config says
        except OSError as e:
            sock.close()
            raise ConfigError(f"agent.port={self.port}: cannot listen on 127.0.0.1 ({e.strerror})") from None
        port = sock.getsockname()[1]
        app = build_server(self.desk, self.schemas).streamable_http_app(host="127.0.0.1")
        gate = TokenGate(app, token, self.token_file, self.desk.session_closed)
        # open event streams must not hold up the end of the search
        self._uv = uvicorn.Server(uvicorn.Config(gate, log_level="warning", lifespan="on", timeout_graceful_shutdown=3))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._uv.serve(sockets=[sock])),
                                        name="avo-mcp", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the MCP endpoint on 127.0.0.1:{port} did not start within {timeout_s:.0f} s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}/mcp"
        atomic_write_json(endpoint_path(self.run_dir), {
            "url": self.url, "token_file": str(self.token_file.resolve()), "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat()})
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._uv is not None:
            # an agent's open event stream is cancelled after timeout_graceful_shutdown, which uvicorn logs as an
            # error with a traceback: expected when the search stops, so not for the search's log
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            if json.loads(endpoint_path(self.run_dir).read_text()).get("pid") == os.getpid():
                endpoint_path(self.run_dir).unlink()
                self.token_file.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass


# -- the client side (the stdio relay, the CLI) ---------------------------------------------------
class NoEndpoint(RuntimeError):
    pass


def innermost(e: BaseException) -> BaseException:
    """The error itself, out of the task groups the MCP client wraps it in."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def read_endpoint(run_dir: str | Path, wait_s: float = 0.0) -> tuple[str, str]:
    """(url, token) of the search serving run_dir, waiting up to wait_s for it to start."""
    path = endpoint_path(Path(run_dir).expanduser())
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(path.read_text())
            if not _alive(info["pid"]):  # the endpoint is on 127.0.0.1: its search runs on this machine
                raise ProcessLookupError(info["pid"])
            return info["url"], Path(info["token_file"]).read_text().strip()
        except ProcessLookupError:
            if time.monotonic() >= deadline:
                raise NoEndpoint(f"{path} is left over from a search that is gone (pid {info['pid']})") from None
        except (OSError, ValueError, KeyError) as e:
            if time.monotonic() >= deadline:
                raise NoEndpoint(f"no MCP endpoint in {path} ({type(e).__name__}): is a search with agent=external "
                                 "running in that run directory?") from None
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@asynccontextmanager
async def connect(url: str, token: str, name: str, version: str = "", label: dict | None = None):
    """An MCP client session to the search's endpoint. `label["client"]`, when set, names the real client."""
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    async def stamp(request):
        if label and label.get("client"):
            request.headers[CLIENT_HEADER] = label["client"]

    # a tool call may run a full benchmark: the read timeout covers the harness's own
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, event_hooks={"request": [stamp]},
                              timeout=httpx2.Timeout(30.0, read=3600.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode="legacy",
                            client_info=types.Implementation(name=name, version=version)) as client:
        yield client


def main(argv: list[str] | None = None) -> int:
    from avo.agent.mcp_stdio import main as stdio_main

    return stdio_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
