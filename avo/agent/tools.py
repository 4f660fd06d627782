"""The agent's tools: schemas offered to the model and their implementations over one proposal's state.

Every tool returns text for the model. Bad arguments, failed edits and harness failures come back as
tool results the model can act on; nothing here raises into the conversation loop.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from avo.agent.edits import Edit, EditError, apply_edits, unified_diff
from avo.agent.knowledge import KnowledgeBase
from avo.agent.memory import Notes
from avo.harness.profile import ProfileError
from avo.lineage import sha256
from avo.types import EvalResult, StepContext


def tool_schema(name: str, description: str, props: dict[str, dict] | None = None, required: list[str] | None = None):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props or {}, "required": required or [], "additionalProperties": False}}}


_REF = {"type": "string", "description": "current (your working copy), best, v<k> (committed version k), "
                                         "or attempt<i> (an earlier failed attempt of this step)"}
SCHEMAS = [
    tool_schema("view_source", "Show a kernel source with line numbers. A source longer than one tool result is "
                               "shown in parts: the header says which lines came and where the next part starts.",
        {"which": _REF, "start_line": {"type": "integer", "description": "first line (default 1)"},
         "end_line": {"type": "integer", "description": "last line (default: the end)"}}),
    tool_schema("diff", "Unified diff between two sources.", {"a": _REF, "b": _REF}, ["a", "b"]),
    tool_schema("lineage", "The committed versions (score, message) and this step's failed attempts."),
    tool_schema("edit", "Replace one exact, unique piece of the working copy. `search` is copied verbatim from it.",
        {"search": {"type": "string"}, "replace": {"type": "string"}}, ["search", "replace"]),
    tool_schema("rewrite", "Replace the whole working copy with a complete kernel source.",
        {"source": {"type": "string"}}, ["source"]),
    tool_schema("compile", "Compile the working copy: errors, registers, spills, shared memory, threads."),
    tool_schema("test", "Correctness check of the working copy on small shapes (fast)."),
    tool_schema("benchmark", "Full evaluation of the working copy: correctness, then TFLOPS per benchmark config "
                             "and the ratio to cuDNN (slow)."),
    tool_schema("profile", "Nsight Compute summary of one launch of the working copy (throughput, occupancy, warp "
                           "stalls, the SASS instructions the warps wait at, ncu's findings), where a profiler is "
                           "available. Not a correctness check.",
        {"shape": {"type": "string", "description": "a benchmark config key (default: the first one)"}}),
    tool_schema("search_knowledge", "Search the knowledge base (Hopper, PTX, FlashAttention, the kernel contract, "
                                    "this run's lessons).", {"query": {"type": "string"}}, ["query"]),
    tool_schema("read_notes", "Read your notes from earlier steps."),
    tool_schema("write_note", "Save a note for later steps (what worked, what failed, ideas).",
        {"text": {"type": "string"}}, ["text"]),
    tool_schema("submit", "Submit the working copy as this step's candidate; the harness decides whether it is "
                          "committed. Ends the step.",
        {"message": {"type": "string", "description": "what changed and why"}}, ["message"]),
]
NAMES = [s["function"]["name"] for s in SCHEMAS]
EDITING = ("edit", "rewrite")


@dataclass
class ToolResult:
    text: str
    ok: bool
    source_changed: bool = False


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


@dataclass
class Workbench:
    """One proposal's state: the working copy and what the harness said about it."""
    ctx: StepContext
    notes: Notes
    knowledge: KnowledgeBase
    output_chars: int = 12_000
    offered: tuple[str, ...] = tuple(NAMES)
    source: str = ""
    compiled_ok: str | None = None      # the last working copy that compiled
    checked_ok: str | None = None       # the last working copy that passed the correctness check
    submitted: tuple[str, str] | None = None  # (source, message)
    calls: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def __post_init__(self):
        self.source = self.source or self.ctx.best.source
        self.versions = {f"v{v.version}": v for v in self.ctx.history}

    # -- dispatch --------------------------------------------------------------------------------
    def call(self, name: str, raw_args: str | dict | None) -> ToolResult:
        self.calls[name] = self.calls.get(name, 0) + 1
        impl: Callable[..., ToolResult] | None = getattr(self, f"t_{name}", None) if name in self.offered else None
        if impl is None:
            return self._err(f"unknown tool {name!r}; the tools are: {', '.join(self.offered)}")
        args, problem = parse_args(SCHEMAS[NAMES.index(name)], raw_args)
        if problem:
            return self._err(problem)
        try:
            r = impl(**args)
        except (TypeError, ValueError, KeyError, EditError) as e:
            return self._err(f"{name}: {e}")
        if not r.ok:
            self.errors += 1
        return ToolResult(truncate(r.text, self.output_chars), r.ok, r.source_changed)

    def _err(self, text: str) -> ToolResult:
        self.errors += 1
        return ToolResult(text, False)

    def resolve(self, ref: str | None) -> str:
        ref = (ref or "current").strip().lower()
        if ref == "current":
            return self.source
        if ref == "best":
            return self.ctx.best.source
        if ref in self.versions:
            return self.versions[ref].source
        if ref.startswith("attempt") and ref[7:].isdigit() and int(ref[7:]) < len(self.ctx.failures):
            return self.ctx.failures[int(ref[7:])].source
        known = ["current", "best", *self.versions, *(f"attempt{i}" for i in range(len(self.ctx.failures)))]
        raise KeyError(f"unknown source {ref!r}; known: {', '.join(known)}")

    # -- viewing ---------------------------------------------------------------------------------
    def t_view_source(self, which: str = "current", start_line: int = 1, end_line: int | None = None) -> ToolResult:
        lines = self.resolve(which).splitlines()
        n = len(lines)
        lo, hi = max(1, start_line), min(n, n if end_line is None else end_line)
        if lo > hi:
            return ToolResult(f"view_source: no lines in {lo}-{hi}; {which} has {n} lines", False)
        # whole lines only, within one result: the header never claims a line it does not show
        room = self.output_chars - 400
        shown: list[str] = []
        for i in range(lo, hi + 1):
            row = f"{i:4d}  {lines[i - 1]}"
            if shown and sum(map(len, shown)) + len(shown) + len(row) > room:
                break
            shown.append(row)
        last = lo + len(shown) - 1
        if last == hi:
            return ToolResult(f"{which} lines {lo}-{hi} of {n}:\n" + "\n".join(shown), True)
        more = (f"lines {last + 1}-{hi} not shown (one result holds {self.output_chars} characters, "
                f"agent.budget.tool_output_chars): call view_source with which={which!r}, start_line={last + 1}")
        return ToolResult(f"{which} lines {lo}-{last} of {n}; {more}\n" + "\n".join(shown) + f"\n[{more}]", True)

    def t_diff(self, a: str, b: str) -> ToolResult:
        return ToolResult(unified_diff(self.resolve(a), self.resolve(b), a, b), True)

    def t_lineage(self) -> ToolResult:
        return ToolResult(lineage_text(self.ctx), True)

    # -- editing ---------------------------------------------------------------------------------
    def t_edit(self, search: str, replace: str) -> ToolResult:
        return self._apply("edit", {"search": search, "replace": replace}, "edit applied")

    def t_rewrite(self, source: str) -> ToolResult:
        return self._apply("rewrite", {"source": source}, "source replaced")

    def _apply(self, name: str, args: dict, what: str) -> ToolResult:
        try:
            new = apply_tool_edit(self.source, name, args)
        except EditError as e:
            return ToolResult(f"{name} not applied: {e}", False)

        old, self.source = self.source, new
        d = unified_diff(old, new, "before", "after", context=1)
        return ToolResult(f"{what} ({len(new.splitlines())} lines). Diff:\n{truncate(d, 3000)}", True, True)

    # -- the harness -----------------------------------------------------------------------------
    def _evaluate(self, purpose: str) -> EvalResult:
        r = getattr(self.ctx.bench, purpose)(self.source)
        if r.ok:
            self.compiled_ok = self.source
            if purpose != "compile" and self.ctx.bench.checks:  # a compile-only harness checks nothing
                self.checked_ok = self.source
        return r

    def t_compile(self) -> ToolResult:
        r = self._evaluate("compile")
        return ToolResult(format_eval(r, "compile", self.ctx), r.ok)

    def t_test(self) -> ToolResult:
        r = self._evaluate("check")
        return ToolResult(format_eval(r, "test", self.ctx), passed(r, "test", self.ctx))

    def t_benchmark(self) -> ToolResult:
        r = self._evaluate("benchmark")
        return ToolResult(format_eval(r, "benchmark", self.ctx), passed(r, "benchmark", self.ctx))

    def t_profile(self, shape: str = "") -> ToolResult:
        try:
            return ToolResult(self.ctx.bench.profile(self.source, shape or None), True)
        except ProfileError as e:
            return ToolResult(f"profile: {e}", False)

    # -- knowledge and notes ---------------------------------------------------------------------
    def t_search_knowledge(self, query: str) -> ToolResult:
        return ToolResult(self.knowledge.render(query), True)

    def t_read_notes(self) -> ToolResult:
        return ToolResult(self.notes.recent() or "(no notes yet)", True)

    def t_write_note(self, text: str) -> ToolResult:
        return ToolResult(self.notes.add(self.ctx.step, text), True)

    # -- the end ---------------------------------------------------------------------------------
    def t_submit(self, message: str) -> ToolResult:
        problem = self.rejects(self.source)
        if problem:
            return ToolResult(f"not submitted: {problem}", False)
        self.submitted = (self.source, message.strip() or "(no message)")
        return ToolResult("submitted; the harness will evaluate it", True)

    def rejects(self, source: str) -> str | None:
        """Why this source cannot be this step's candidate, or None."""
        if source == self.ctx.best.source:
            return "the working copy is identical to the best version; change something first"
        sha = sha256(source)
        if sha in self.ctx.tried or any(sha256(a.source) == sha for a in self.ctx.failures):
            return "this exact source was already evaluated in this run; change something first"
        return None


# the JSON Schema types the tools' parameters use (a test holds every schema to these)
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}


def parse_args(schema: dict, raw_args: str | dict | None) -> tuple[dict, str | None]:
    """The arguments of a call to the tool `schema` describes, checked against its input schema (required,
    unknown keys, types), or the one-line reason they are unusable; nothing runs with arguments that fail."""
    name, spec = schema["function"]["name"], schema["function"]["parameters"]
    try:
        args = raw_args if isinstance(raw_args, dict) else json.loads(raw_args or "{}")
    except ValueError as e:
        return {}, f"the arguments of {name} are not valid JSON ({e}); send one JSON object"
    if not isinstance(args, dict):
        return {}, f"the arguments of {name} must be a JSON object, got {type(args).__name__}"
    props = spec["properties"]
    missing = [k for k in spec["required"] if k not in args]
    unknown = [k for k in args if k not in props]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"unknown argument {', '.join(unknown)}"] if unknown else [])
    typed = {}
    for key, value in args.items():
        if key in props:
            typed[key], problem = _typed(key, props[key]["type"], value)
            problems += [problem] if problem else []
    if problems:
        params = ", ".join(f"{k} ({p['type']}{'' if k in spec['required'] else ', optional'})"
                           for k, p in props.items()) or "none"
        return {}, f"{name}: {'; '.join(problems)}; nothing was run (parameters: {params})"
    return typed, None


def _typed(key: str, kind: str, value) -> tuple[object, str | None]:
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 3 from 3.0
    ok = isinstance(value, JSON_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))
    if ok and kind == "number" and not math.isfinite(value):
        return value, f"{key} must be a finite number, got {value}"
    if ok:
        return value, None
    got = _JSON_NAMES.get(type(value), type(value).__name__)
    article = "an" if kind[0] in "aeiou" else "a"
    return value, f"{key} must be {article} {kind}, got {got}" + (f" {value!r}"[:60] if value is not None else "")


def apply_tool_edit(source: str, name: str, args: dict) -> str:
    """The working copy after an `edit` or `rewrite` call (shared with replay, so both agree exactly)."""
    if name == "edit":
        return apply_edits(source, [Edit(args["search"], args["replace"])])
    new = args["source"]
    if "avo_attention" not in new or "AVO_LAUNCH" not in new:
        raise EditError("a complete kernel defines `avo_attention` and states its geometry with AVO_LAUNCH(...) "
                        "(see kernels_cuda/CONTRACT.md)")
    return new if new.endswith("\n") else new + "\n"


def _proved(v) -> str:
    """What the lineage proved about a version (avo.history); a score alone compares with nothing measured apart."""
    own = f"{v.score:.1f} TFLOPS in its own evaluation" if v.score is not None else "unranked"
    if v.chain_ratio is None or not v.version:
        return own
    parent = f"x{v.ratio:.4f} over its parent, " if v.ratio is not None else ""
    return f"{parent}x{v.chain_ratio:.4f} over v0, timed side by side ({own})"


def lineage_text(ctx: StepContext, last: int = 12) -> str:
    rows = [f"v{v.version}: {_proved(v)} - "
            f"{(v.message or '').splitlines()[0][:160] if v.message else ''}" for v in ctx.history[-last:]]
    head = f"(showing the last {last} of {len(ctx.history)} versions)\n" if len(ctx.history) > last else ""
    text = ("Committed versions (oldest first; the last, the head, is the best):\n" + head + "\n".join(rows))
    if ctx.failures:
        text += "\n\nThis step's earlier attempts (not committed):\n" + "\n".join(
            f"attempt{i}: {a.status.value}/{a.decision}"
            f"{f', {a.score:.1f} TFLOPS' if a.score is not None else ''} - {a.message[:120]}"
            f"{' | ' + a.error.splitlines()[0][:300] if a.error else ''}" for i, a in enumerate(ctx.failures))
    return text


def passed(r: EvalResult, what: str, ctx: StepContext) -> bool:
    """A test or benchmark passes only when it checked something: on a harness that runs no kernel
    (harness=compile) a compiled source is not a pass."""
    return r.ok and (what == "compile" or ctx.bench.checks)


def format_eval(r: EvalResult, what: str, ctx: StepContext) -> str:
    name = ctx.bench.name
    if r.ok and not passed(r, what, ctx):
        head = (f"unchecked: {what} ran no kernel: harness={name} only compiles, so the working copy compiled but "
                "neither its correctness nor its speed is known. This is not a pass.")
    elif what == "test":
        head = f"test: {r.status.value} (correctness on the check shapes)"
    elif what == "benchmark" and r.ok and not r.ranked:
        head = f"benchmark: {r.status.value} (correct; harness={name} does not time kernels)"
    else:
        head = f"{what}: {r.status.value}"
    lines = [head]
    res = {"registers": r.registers, "spill_bytes": r.spill_bytes, "stack_bytes": r.stack_bytes,
           "smem_bytes": r.smem_bytes, "threads": r.threads}
    known = ", ".join(f"{k}={v}" for k, v in res.items() if v is not None)
    if known:
        lines.append(f"resources: {known}" + (f" ({r.compiler})" if r.compiler else ""))
    if r.error:
        lines.append(f"error: {r.error}")
    if not r.ok and r.log:
        lines.append(f"log:\n{truncate(r.log, 4000)}")
    if r.ranked and r.score is not None:
        if r.paired_ratio is not None:
            lines.append(f"score: {r.score:.1f} TFLOPS geometric mean; {r.paired_ratio:.4f}x the best v"
                         f"{ctx.best.version} timed side by side ({r.incumbent_score:.1f} TFLOPS in the same run; "
                         f"bounds {r.paired_lo:.4f}..{r.paired_hi:.4f})")
        else:
            lines.append(f"score: {r.score:.1f} TFLOPS geometric mean")
        if r.stage == "screen":
            lines.append("stopped at the screen: clearly slower than the best version on its cheapest shapes")
        lines.append("config | TFLOPS | best (same run) | ratio | vs cuDNN")
        for c in r.configs:
            b = c.incumbent_tflops
            lines.append(f"{c.key} | {c.tflops or 0:.1f} | {f'{b:.1f}' if b else '-'} | "
                         f"{f'{c.ratio:.4f}' if c.ratio else '-'} | {f'{c.vs_cudnn:.3f}' if c.vs_cudnn else '-'}")
    return "\n".join(lines)

