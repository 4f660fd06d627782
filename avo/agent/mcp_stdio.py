"""The stdio face of the MCP server: relays an agent's requests to the running search's endpoint.

    python -m avo.agent.mcp_server --run-dir <run dir> [--wait 60]
    python -m avo.agent.mcp_server --run-dir <run dir> --print-config

An agent that starts its MCP servers itself runs this command. The search owns the step and its
records; this process holds one MCP session to the search (with the token from the run directory),
passes on the name the agent declared and the search's progress notifications, and ends that session
when the agent closes stdio, which the search treats as a disconnect. When the search stops and starts
again (a restart, a Slurm requeue: a new port and a new token), the relay connects to the new one, so
the agent's configuration outlives the search; the call that was in flight answers with an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio
import mcp_types as types
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from avo.agent.mcp_server import NoEndpoint, connect, innermost, read_endpoint, server


def log(text: str) -> None:
    print(f"avo mcp: {text}", file=sys.stderr, flush=True)


class Upstream:
    """The relay's session to the search serving run_dir, opened again whenever that search restarts."""

    def __init__(self, run_dir: str, wait_s: float):
        self.run_dir, self.wait_s = run_dir, wait_s
        self.label: dict[str, str] = {}
        self.client = None
        self.changed = anyio.Event()   # set (and replaced) whenever a session opens or closes
        self.stop = anyio.Event()      # the agent closed stdio

    async def keep(self) -> None:
        """Run until `stop`: connect, hold the session until it breaks, connect again. A stop closes the
        session properly (the search sees the disconnect at once)."""
        url = ""
        while not self.stop.is_set():
            try:
                new_url, token = read_endpoint(self.run_dir)
            except NoEndpoint:
                new_url = ""
            if new_url:
                if url and new_url != url:
                    log(f"the search serving {self.run_dir} restarted; connected to {new_url}")
                url = new_url
                try:
                    async with connect(url, token, "avo-stdio-relay", label=self.label) as c:
                        self._set(c)
                        await self.stop.wait()  # or the transport fails (the search stopped): then cancelled
                except Exception as e:  # noqa: BLE001 - the search went away: look for the next one
                    log(f"the connection to the search was lost ({type(innermost(e)).__name__}); waiting for it")
                finally:
                    self._set(None)
            with anyio.move_on_after(1.0):
                await self.stop.wait()

    def _set(self, client) -> None:
        self.client = client
        self.changed.set()
        self.changed = anyio.Event()

    async def get(self):
        """The open session, waiting up to wait_s for one."""
        with anyio.move_on_after(self.wait_s):
            while self.client is None:
                await self.changed.wait()
        if self.client is None:
            raise NoEndpoint(f"no search with agent=external serves {self.run_dir} (waited {self.wait_s:.0f} s); "
                             "start it, or call again")
        return self.client


def failed(name: str, e: MCPError) -> types.CallToolResult:
    if e.code == types.CONNECTION_CLOSED:
        text = (f"{name}: the connection to the search was lost while the call ran; the search stopped or "
                "restarted, so this call's effect is unknown. Call next_step: after a restart it opens a new step.")
    else:
        text = f"{name}: the search answered with an error ({e.error.message})"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


async def relay(run_dir: str, wait_s: float) -> None:
    up = Upstream(run_dir, wait_s)

    async def list_tools(ctx, params) -> types.ListToolsResult:
        try:
            return await (await up.get()).list_tools()
        except NoEndpoint as e:
            raise MCPError(code=types.INTERNAL_ERROR, message=str(e)) from None

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        info = getattr(ctx.session.client_params, "client_info", None)
        if info is not None and not up.label.get("client"):
            up.label["client"] = f"{info.name} {info.version}".strip()

        async def forward(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        try:
            client = await up.get()
        except NoEndpoint as e:
            return types.CallToolResult(content=[types.TextContent(type="text", text=str(e))], is_error=True)
        try:
            return await client.call_tool(params.name, params.arguments or {}, progress_callback=forward)
        except MCPError as e:
            return failed(params.name, e)

    relayed = server(list_tools, call_tool)
    async with anyio.create_task_group() as tg:
        tg.start_soon(up.keep)
        async with stdio_server() as (read, write):
            await relayed.run(read, write, relayed.create_initialization_options())
        up.stop.set()  # the agent closed stdio: end the session, which ends its step


def client_config(run_dir: str) -> dict:
    """The `mcpServers` entry that starts this relay with this interpreter (it survives restarts of the search)."""
    return {"mcpServers": {"avo": {"command": sys.executable, "args": [
        "-m", "avo.agent.mcp_server", "--run-dir", str(Path(run_dir).expanduser().resolve())]}}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.agent.mcp_server", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="the run directory of a search with agent=external")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="seconds a request waits for the search's endpoint (at the start, after a restart)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the MCP client configuration (mcpServers JSON) that starts this relay, and exit")
    args = ap.parse_args(argv)
    if args.print_config:
        print(json.dumps(client_config(args.run_dir), indent=2))
        return 0
    try:
        anyio.run(relay, args.run_dir, args.wait)
    except Exception as e:  # noqa: BLE001 - one line for the agent's log, not a traceback
        log(f"the relay failed ({type(innermost(e)).__name__}: {innermost(e)})")
        return 1
    return 0
