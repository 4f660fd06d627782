"""The external agent's tools from a shell: one MCP call to the search serving a run directory.

    python -m avo.tool <run dir> next_step [model=<name>] [wait_seconds=60]
    python -m avo.tool <run dir> edit search=@old.txt replace=@new.txt
    python -m avo.tool <run dir> rewrite source=@kernel.cu
    python -m avo.tool <run dir> compile | test | benchmark | lineage | read_notes
    python -m avo.tool <run dir> submit message="BLOCK_N 64 -> 128"
    python -m avo.tool <run dir> --list
    python -m avo.tool <run dir> --batch candidates.txt [--model <name>]

Each call goes through the search's MCP endpoint (agent=external), so it runs the same tool code and
lands in the same transcript as an MCP agent's. `name=@file` reads the value from a file (`@-`: stdin).
Prints the tool's text; exit status 0 when the tool succeeded, 1 when it reported an error, 2 when the
command line or the connection is wrong.

--batch submits candidates written ahead of time, one per step, as an agent would: each line of the file
is `<source file> <message>` (blank lines and `#` comments are skipped). For each: next_step (asked again
while the harness is busy), rewrite, compile, and submit only if it compiled (else the same step takes
the next file). Each verdict is the lineage's row for that source, printed as it arrives, then one table;
exit status 0 when every file was submitted and judged, 1 when one was not.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import anyio

from avo.agent.desk import NOT_READY, ONE_SHOT_CLIENT
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


def read_batch(path: str) -> list[tuple[str, str]]:
    """(source file, message) per line of a batch file; every file must exist."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"--batch: cannot read {path} ({e.strerror})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        src, _, msg = line.strip().partition(" ")
        if not Path(src).is_file():
            raise UsageError(f"--batch {path}, line {n}: no source file {src!r}")
        if not msg.strip():
            raise UsageError(f"--batch {path}, line {n}: a message must follow the file name")
        out.append((src, msg.strip()))
    if not out:
        raise UsageError(f"--batch: {path} names no candidate")
    return out


def first_line(text: str | None, limit: int = 300) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def submitted_source(path: str) -> str:
    """The working copy that `rewrite source=@path` makes, whose hash the lineage records."""
    from avo.agent.tools import apply_tool_edit

    return apply_tool_edit("", "rewrite", {"source": Path(path).read_text(encoding="utf-8")})


def verdict(run_dir: str, source: str, since: datetime, wait_s: float) -> str | None:
    """The lineage's row for `source` recorded after `since`, as one line; None if none came in wait_s."""
    import polars as pl

    from avo import lineage

    end = time.monotonic() + wait_s
    while True:
        rows = lineage.read_run(run_dir).filter((pl.col("source_sha") == lineage.sha256(source))
                                                & (pl.col("finished_at") >= since))
        if len(rows):
            r = rows.sort("finished_at").row(-1, named=True)
            out = f"{r['candidate_id']} {r['decision']}" + (f" as v{r['version']}" if r["version"] is not None else "")
            if r["paired_ratio"] is not None:
                out += f", x{r['paired_ratio']:.4f} [{r['paired_lo']:.4f}, {r['paired_hi']:.4f}] over its parent"
            if r["status"] != "ok":
                out += f" ({r['status']}: {first_line(r['error'], 200)})"
            return out
        if time.monotonic() >= end:
            return None
        time.sleep(1.0)


def batch(run_dir: str, items: list[tuple[str, str]], model: str, wait_s: float, step_timeout_s: float,
          say=print) -> int:
    """Submit each (source file, message) through the tools, one step each, and read each verdict from the
    lineage: the row of that source recorded after its submit (with its paired ratio)."""
    def tool(name: str, *pairs: str) -> tuple[str, bool]:
        return anyio.run(run, run_dir, name, list(pairs), wait_s)

    def open_step() -> bool:
        end = time.monotonic() + step_timeout_s
        while time.monotonic() < end:
            text, ok = tool("next_step", "wait_seconds=120", *([f"model={model}"] if model else []))
            if not ok:
                say(f"next_step: {text.strip()[:300]}")
                return False
            if not text.startswith(NOT_READY):
                return True
        say(f"next_step: no step opened in {step_timeout_s:.0f} s")
        return False

    outcome = ["not submitted"] * len(items)
    judged: set[int] = set()
    pending = None  # (index, the source submitted, when): its row is on record once the next step opens

    def settle(wait: float) -> None:
        nonlocal pending
        if pending is not None:
            n, source, since = pending
            v = verdict(run_dir, source, since, wait)
            outcome[n] = v or "submitted; no verdict on record yet"
            judged.update([n] if v else [])
            say(f"{items[n][0]}: {outcome[n]}")
            pending = None

    step_open = False
    for n, (src, msg) in enumerate(items):
        if not step_open:
            step_open = open_step()
            settle(30.0)
            if not step_open:
                break
        text, ok = tool("rewrite", f"source=@{src}")
        if ok:
            text, ok = tool("compile")
        if ok:
            source, since = submitted_source(src), datetime.now(timezone.utc)
            text, ok = tool("submit", f"message={msg}")
        if not ok:  # the step stays open for the next file
            first = first_line(text) or "failed"
            outcome[n] = first if first.startswith("not submitted") else f"not submitted: {first}"
            say(f"{src}: {outcome[n]}")
            continue
        pending, step_open = (n, source, since), False
        say(f"{src}: submitted")
    settle(step_timeout_s)  # the last one: no further step is opened to wait for it
    say("\n| file | verdict |\n|---|---|")
    for (src, _), o in zip(items, outcome, strict=True):
        say(f"| {src} | {o} |")
    return 0 if len(judged) == len(items) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.tool", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("tool", nargs="?", help="a tool name (see --list)")
    ap.add_argument("args", nargs="*", help="name=value arguments; name=@file reads a file")
    ap.add_argument("--list", action="store_true", help="list the tools the search offers")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the search's endpoint")
    ap.add_argument("--batch", metavar="FILE", help="submit the candidates FILE lists (`<source> <message>` a line)")
    ap.add_argument("--model", default="", help="with --batch: the model the lineage records for the steps")
    ap.add_argument("--step-timeout", type=float, default=900.0,
                    help="with --batch: seconds to wait for each step to open (the harness judging the last)")
    a = ap.parse_args(argv)
    if a.batch and (a.tool or a.list):
        ap.error("--batch takes no tool name")
    if not a.list and not a.tool and not a.batch:
        ap.error("name a tool, --list or --batch")
    try:
        if a.batch:
            return batch(a.run_dir, read_batch(a.batch), a.model, a.wait, a.step_timeout)
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
