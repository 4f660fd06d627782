"""Source edits the agent asks for: SEARCH/REPLACE blocks and full rewrites.

An edit either applies exactly or fails with a message the model can act on
(which block, and the closest line it may have meant); it never half-applies.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"^<{5,9} ?SEARCH[^\n]*\n(?P<search>.*?)^={5,9}[ \t]*\n(?P<replace>.*?)^>{5,9} ?REPLACE[^\n]*$",
                    re.M | re.S)
_FENCE = re.compile(r"```(?:cuda|cpp|c\+\+|cu|c)?[ \t]*\n(?P<body>.*?)^```", re.M | re.S)


class EditError(ValueError):
    """The edit cannot be applied; the message says which part and why."""


@dataclass(frozen=True)
class Edit:
    search: str
    replace: str


def parse_blocks(text: str) -> list[Edit]:
    """SEARCH/REPLACE blocks in free text (the reply of a model that did not call a tool)."""
    return [Edit(m["search"], m["replace"]) for m in _BLOCK.finditer(text)]


def extract_source(text: str) -> str | None:
    """The largest fenced code block that looks like a complete kernel, if any."""
    bodies = [m["body"] for m in _FENCE.finditer(text) if "avo_attention" in m["body"]]
    return max(bodies, key=len) if bodies else None


def apply_edits(source: str, edits: list[Edit]) -> str:
    """Apply the edits in order; raise EditError naming the first that does not apply."""
    if not edits:
        raise EditError("no edit given: pass `search` (text copied exactly from the current source) and `replace`")
    for i, e in enumerate(edits, 1):
        try:
            source = _apply_one(source, e)
        except EditError as err:
            prefix = f"edit {i} of {len(edits)}: " if len(edits) > 1 else ""
            raise EditError(prefix + str(err)) from None
    return source


def _apply_one(source: str, e: Edit) -> str:
    if not e.search.strip():
        raise EditError("`search` is empty; copy the lines to change from the current source")
    if e.search == e.replace:
        raise EditError("`search` and `replace` are identical; nothing would change")
    n = source.count(e.search)
    if n == 1:
        return source.replace(e.search, e.replace, 1)
    if n > 1:
        raise EditError(f"`search` occurs {n} times; include more surrounding lines so it matches once")
    # Models often get indentation or trailing spaces wrong: match line by line, ignoring them.
    src_lines = source.splitlines(keepends=True)
    want = [ln.strip() for ln in e.search.strip("\n").splitlines()]
    hits = [i for i in range(len(src_lines) - len(want) + 1)
            if all(src_lines[i + j].strip() == want[j] for j in range(len(want)))]
    if len(hits) == 1:
        i = hits[0]
        replace = e.replace if e.replace.endswith("\n") or not e.replace else e.replace + "\n"
        return "".join(src_lines[:i]) + replace + "".join(src_lines[i + len(want):])
    if len(hits) > 1:
        raise EditError(f"`search` matches {len(hits)} places (ignoring indentation); include more lines")
    raise EditError("`search` does not occur in the current source" + _hint(source, want))


def _hint(source: str, want: list[str]) -> str:
    first = next((w for w in want if w), "")
    close = difflib.get_close_matches(first, [ln.strip() for ln in source.splitlines()], n=1, cutoff=0.6)
    if close:
        return f"; its first line {first[:80]!r} is closest to {close[0][:80]!r} (view the source and copy exactly)"
    return "; view the current source and copy the lines exactly"


def unified_diff(a: str, b: str, a_name: str = "a", b_name: str = "b", context: int = 3) -> str:
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), a_name, b_name, n=context)
    return "".join(lines) or "(no difference)"
