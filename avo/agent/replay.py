"""Reproduce a step's candidate from its transcript, without the LLM.

    python -m avo.agent.replay <run_dir>/transcripts/step00003-a00.jsonl [-o candidate.cu]

Starts from the source recorded in the transcript, re-applies every edit and rewrite that succeeded,
in order, checks each intermediate hash against the record, and prints (or writes) the candidate.
Exit status 0 when the candidate's hash matches the recorded one, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avo.agent.tools import EDITING, apply_tool_edit
from avo.agent.transcript import read
from avo.lineage import sha256


class ReplayError(RuntimeError):
    pass


def replay(path: str | Path) -> tuple[str, dict]:
    """(candidate source, end event); raises ReplayError when the record and the replay disagree."""
    events = read(path)
    start = next((e for e in events if e["event"] == "start"), None)
    end = next((e for e in events if e["event"] == "end"), None)
    if start is None:
        raise ReplayError(f"{path}: no start event; not a step transcript")
    if end is None:
        raise ReplayError(f"{path}: no end event; the step did not finish")
    source = start["source"]
    by_sha = {sha256(source): source}
    for e in events:
        if e["event"] != "tool_result" or e["name"] not in EDITING or not e["ok"]:
            continue
        args = e["arguments"]
        source = apply_tool_edit(source, e["name"], json.loads(args) if isinstance(args, str) else args)
        if sha256(source) != e["source_sha"]:
            raise ReplayError(f"{path}: replaying {e['name']} (call {e['id']}) gives a different source than recorded")
        by_sha[sha256(source)] = source
    if "source_sha" not in end:  # invalid, interrupted
        raise ReplayError(f"{path}: the step produced no candidate ({end['outcome']}: {end.get('reason', '')})")
    if end["source_sha"] not in by_sha:
        raise ReplayError(f"{path}: the recorded candidate {end['source_sha'][:12]} is not reproduced by the edits")
    return by_sha[end["source_sha"]], end


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avo.agent.replay", description=__doc__.splitlines()[0])
    ap.add_argument("transcript")
    ap.add_argument("-o", "--output", help="write the candidate here instead of stdout")
    args = ap.parse_args(argv)
    try:
        source, end = replay(args.transcript)
    except (ReplayError, OSError, ValueError, KeyError) as e:
        print(f"replay failed: {e}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(source)
        print(f"candidate {end['source_sha'][:12]} ({end['outcome']}) written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
