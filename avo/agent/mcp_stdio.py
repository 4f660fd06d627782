"""The stdio face of the MCP server: relays an agent's requests to the running search's endpoint.

    python -m avo.agent.mcp_server --run-dir <run dir> [--wait 60]

An agent that starts its MCP servers itself runs this command. The search owns the step and its
records; this process holds one MCP session to the search (with the token from the run directory),
passes on the name the agent declared, and ends that session when the agent closes stdio, which the
search treats as a disconnect.
"""
from __future__ import annotations

import argparse
import sys

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from avo.agent.mcp_server import NoEndpoint, connect, innermost, instructions, read_endpoint


async def relay(run_dir: str, wait_s: float) -> None:
    url, token = read_endpoint(run_dir, wait_s)
    label: dict[str, str] = {}
    async with connect(url, token, "avo-stdio-relay", label=label) as up:
        async def list_tools(ctx, params) -> types.ListToolsResult:
            return await up.list_tools()

        async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
            info = getattr(ctx.session.client_params, "client_info", None)
            if info is not None and not label.get("client"):
                label["client"] = f"{info.name} {info.version}".strip()
            return await up.call_tool(params.name, params.arguments or {})

        server = Server("avo", instructions=instructions(), on_list_tools=list_tools, on_call_tool=call_tool)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.agent.mcp_server", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="the run directory of a search with agent=external")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the search's endpoint")
    args = ap.parse_args(argv)
    try:
        anyio.run(relay, args.run_dir, args.wait)
    except Exception as e:  # noqa: BLE001 - the search went away: one line for the agent's log, not a traceback
        e = innermost(e)
        print(f"avo mcp: {e}" if isinstance(e, NoEndpoint) else
              f"avo mcp: the connection to the search failed ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    return 0
