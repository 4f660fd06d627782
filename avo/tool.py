"""The external agent's tools from a shell: one MCP call to the search serving a run directory.

    python -m avo.tool <run dir> next_step [model=<name>] [wait_seconds=60]
    python -m avo.tool <run dir> edit search=@old.txt replace=@new.txt
    python -m avo.tool <run dir> rewrite source=@kernel.cu
    python -m avo.tool <run dir> compile | test | benchmark | lineage | read_notes
    python -m avo.tool <run dir> submit message="BLOCK_N 64 -> 128"
    python -m avo.tool <run dir> --list

Each call goes through the search's MCP endpoint (agent=external), so it runs the same tool code and
lands in the same transcript as an MCP agent's. `name=@file` reads the value from a file (`@-`: stdin).
Prints the tool's text; exit status 0 when the tool succeeded, 1 when it reported an error, 2 when the
command line or the connection is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from avo.agent.desk import ONE_SHOT_CLIENT
from avo.agent.mcp_server import NoEndpoint, connect, innermost, read_endpoint


class UsageError(ValueError):
    pass


def parse_pairs(pairs: list[str], schema: dict) -> dict:
    """name=value pairs typed by the tool's input schema; @file reads a file."""
    props = schema.get("properties", {})
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"{pair!r}: arguments are name=value (parameters: {', '.join(props) or 'none'})")
        if value.startswith("@"):
            try:
                value = sys.stdin.read() if value == "@-" else Path(value[1:]).read_text(encoding="utf-8")
            except OSError as e:
                raise UsageError(f"{key}: cannot read {value[1:]} ({e.strerror})") from None
        kind = props.get(key, {}).get("type")
        try:
            args[key] = int(value) if kind == "integer" else float(value) if kind == "number" else value
        except ValueError:
            raise UsageError(f"{key} must be {'an integer' if kind == 'integer' else 'a number'}, got {value!r}") \
                from None
    return args


async def run(run_dir: str, tool: str | None, pairs: list[str], wait_s: float) -> tuple[str, bool]:
    url, token = read_endpoint(run_dir, wait_s)
    async with connect(url, token, ONE_SHOT_CLIENT) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        if tool is None:
            return "\n".join(f"{t.name}: {t.description}" for t in tools.values()), True
        if tool not in tools:
            raise UsageError(f"unknown tool {tool!r}; the tools are: {', '.join(tools)}")
        r = await client.call_tool(tool, parse_pairs(pairs, tools[tool].input_schema))
        return "\n".join(getattr(c, "text", "") for c in r.content), not r.is_error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.tool", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("tool", nargs="?", help="a tool name (see --list)")
    ap.add_argument("args", nargs="*", help="name=value arguments; name=@file reads a file")
    ap.add_argument("--list", action="store_true", help="list the tools the search offers")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the search's endpoint")
    a = ap.parse_args(argv)
    if not a.list and not a.tool:
        ap.error("name a tool, or --list")
    try:
        text, ok = anyio.run(run, a.run_dir, None if a.list else a.tool, a.args, a.wait)
    except Exception as e:  # noqa: BLE001 - a bad command line or a dead endpoint is one line, not a traceback
        e = innermost(e)
        known = isinstance(e, (NoEndpoint, UsageError))
        print(f"avo.tool: {e}" if known else f"avo.tool: the call to the search failed ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
