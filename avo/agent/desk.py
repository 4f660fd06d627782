"""The step an outside agent works on: at most one open step, its workbench, its budgets and its records.

The search thread opens a step and waits for it to end (avo.agent.external); MCP requests call tools
from other threads (avo.agent.mcp_server). Calls run one at a time, each is written to the step's
transcript before and after it runs, and every wait has a deadline.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from avo.agent.tools import SCHEMAS, ToolResult, Workbench, parse_args, tool_schema
from avo.agent.transcript import Transcript
from avo.config import ConfigError
from avo.lineage import sha256
from avo.types import StepContext

# under the tool-call timeout most clients start with (60 s); a client given a longer one may wait longer
DEFAULT_WAIT_S, MAX_WAIT_S = 30.0, 300.0
NOT_READY = "not ready"
NEXT_STEP = tool_schema(
    "next_step", "Wait for the search to open a step and return its context: the problem, the budget, the lineage, "
                 "this step's failed attempts, the supervisor's directions, your notes, the best source and the "
                 "verdict on your previous submission. Call it first, and again after each submit. While the "
                 f"harness evaluates a submission it answers '{NOT_READY}': then call it again.",
    {"wait_seconds": {"type": "number", "description": f"how long to wait for a step (default "
                                                       f"{DEFAULT_WAIT_S:.0f}, at most {MAX_WAIT_S:.0f})"},
     "model": {"type": "string", "description": "the model you run on; the lineage records it"}})
# The CLI (avo.tool) opens one connection per command, so its connections never hold a step.
ONE_SHOT_CLIENT = "avo.tool"


@dataclass
class Caller:
    """Who made a call: the MCP session (None on sessionless transports) and the client's declared name."""
    session: str | None = None
    client: str = ""


@dataclass
class OpenStep:
    ctx: StepContext
    bench: Workbench
    tr: Transcript
    context: str                      # what next_step returns
    max_seconds: float
    max_tool_calls: int
    idle_seconds: float
    t0: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)  # the last call's start or end
    calls: int = 0
    n: int = 0                        # call ids
    busy: bool = False
    seen: bool = False                # an agent called a tool (next_step included) in this step
    owner: str | None = None          # the session that holds the step: its disconnect ends the step
    client: str = ""
    model: str = ""
    ended: str = ""                   # why the step ended ("" while open)
    closed: bool = False              # the transcript is closed: late results are not recorded


class StepDesk:
    def __init__(self):
        self.cond = threading.Condition()
        self.step: OpenStep | None = None
        self.finished = ""            # the search has ended, and why

    # -- the search's side -----------------------------------------------------------------------
    def open(self, s: OpenStep) -> None:
        with self.cond:
            self.step = s
            self.cond.notify_all()

    def wait(self, s: OpenStep, grace_s: float) -> str:
        """Block until the step ends (submit, budget, idle agent, disconnect); then let a call in flight finish
        (a tool call runs the harness, which has its own hard timeout) for at most grace_s."""
        with self.cond:
            while not s.ended:
                now = time.monotonic()
                if now - s.t0 >= s.max_seconds:
                    s.ended = f"time budget used up ({s.max_seconds:.0f} s of agent.budget.max_seconds)"
                elif not s.busy and now - s.last >= s.idle_seconds:
                    s.ended = (f"the agent was silent for {s.idle_seconds:.0f} s (agent.budget.idle_seconds)"
                               + ("" if s.seen else "; no agent called a tool in this step"))
                else:
                    self.cond.wait(min(1.0, s.t0 + s.max_seconds - now))
            deadline = time.monotonic() + grace_s
            while s.busy and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            if s.busy:
                s.tr.event("note", kind="abandoned_call", error=f"a tool call still ran {grace_s:.0f} s after the "
                                                                 "step ended; its result is not recorded")
            s.closed = True
            return s.ended

    def finish(self, reason: str) -> None:
        with self.cond:
            self.finished = self.finished or reason
            self.cond.notify_all()

    def interrupt(self, s: OpenStep, reason: str) -> None:
        """The search is stopping (a signal, a requeue) while the step is open: it ends without a candidate."""
        with self.cond:
            s.ended = s.ended or reason
            s.tr.event("end", outcome="interrupted", reason=reason, client=s.client, model=s.model)
            s.closed = True
            self.finished = f"{reason}; the search resumes when it is started again (then next_step opens a new step)"
            self.cond.notify_all()

    # -- the agent's side (any thread) -----------------------------------------------------------
    def next_step(self, raw_args, who: Caller) -> ToolResult:
        args, problem = parse_args(NEXT_STEP, raw_args)
        if problem:
            return ToolResult(problem, False)
        wait = min(max(0.0, args.get("wait_seconds", DEFAULT_WAIT_S)), MAX_WAIT_S)
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                s = self.step
                if s is not None and not s.ended:
                    self._attach(s, who)
                    s.last = time.monotonic()
                    if args.get("model", "").strip():
                        s.model = args["model"].strip()[:200]
                    s.tr.event("note", kind="next_step", client=who.client, session=who.session, model=s.model)
                    return ToolResult(s.context, True)
                if self.finished:
                    return ToolResult(f"the search has ended: {self.finished}", False)
                left = deadline - time.monotonic()
                if left <= 0:  # a normal answer, not an error: the agent is to ask again
                    return ToolResult(f"{NOT_READY}: no step is open after {wait:.0f} s (the harness is evaluating "
                                      "the last submission, or the search is between steps); call next_step again",
                                      True)
                self.cond.wait(left)

    def call(self, name: str, raw_args, who: Caller) -> ToolResult:
        with self.cond:
            s = self.step
            while s is not None and s.busy and not s.ended:  # one call at a time; wait() bounds the step
                self.cond.wait(1.0)
            if s is None or s.ended:
                return ToolResult(self._closed(s), False)
            self._attach(s, who)
            s.n += 1
            call_id = f"x{s.n}"
            s.tr.event("tool_call", id=call_id, name=name, arguments=raw_args, origin="mcp", client=who.client)
            if name != "submit" and s.calls >= s.max_tool_calls:
                s.ended = f"tool-call budget used up ({s.calls} of agent.budget.max_tool_calls={s.max_tool_calls})"
                text = f"{name} refused: {s.ended}; the step has ended without a candidate"
                self._result(s, call_id, name, raw_args, ToolResult(text, False), 0.0)
                self.cond.notify_all()
                return ToolResult(text, False)
            s.calls += name != "submit"
            s.busy, s.last = True, time.monotonic()
        t = time.monotonic()
        try:
            r = s.bench.call(name, raw_args)  # unknown tools and bad arguments come back as tool errors
        except Exception as e:  # noqa: BLE001 - a tool's bug must not take the server down; it is recorded
            r = ToolResult(f"{name}: internal error ({type(e).__name__}: {e})", False)
        with self.cond:
            s.busy, s.last = False, time.monotonic()
            left = s.max_tool_calls - s.calls
            if name != "submit" and left <= 3:
                r = ToolResult(f"{r.text}\n[{left} tool calls left in this step; then submit]", r.ok,
                               r.source_changed)
            self._result(s, call_id, name, raw_args, r, time.monotonic() - t)
            if s.bench.submitted and not s.ended:
                s.ended = "submitted"
            self.cond.notify_all()
        return r

    def session_closed(self, session: str | None) -> None:
        """The client ended its MCP session; if it held the open step, the step ends without a candidate."""
        with self.cond:
            s = self.step
            if session and s is not None and not s.ended and s.owner == session:
                s.ended = "the agent disconnected (its MCP session closed) before submitting"
                s.tr.event("note", kind="disconnected", session=session, client=s.client)
                self.cond.notify_all()

    # -- helpers (called with the lock held) -----------------------------------------------------
    def _attach(self, s: OpenStep, who: Caller) -> None:
        s.seen = True
        if s.owner is None and who.session and who.client.split(" ")[0] != ONE_SHOT_CLIENT:
            s.owner = who.session
            s.tr.event("note", kind="attached", session=who.session, client=who.client)
        if who.client.split(" ")[0] != ONE_SHOT_CLIENT:
            s.client = s.client or who.client

    def _result(self, s: OpenStep, call_id: str, name: str, args, r: ToolResult, seconds: float) -> None:
        if not s.closed:
            s.tr.event("tool_result", id=call_id, name=name, arguments=args, ok=r.ok, text=r.text,
                       source_sha=sha256(s.bench.source), changed=r.source_changed, seconds=round(seconds, 3))

    def _closed(self, s: OpenStep | None) -> str:
        if self.finished:
            return f"the search has ended: {self.finished}"
        if s is None:
            return "no step is open yet; call next_step"
        return (f"step {s.ctx.step} attempt {s.ctx.attempt} has ended ({s.ended}); call next_step for the verdict "
                "and the next step")


def offered_schemas(tools: list[str]) -> list[dict]:
    """The workbench tools an outside agent gets (all by default; submit always), then next_step."""
    names = [s["function"]["name"] for s in SCHEMAS]
    unknown = sorted(set(tools) - set(names))
    if unknown:
        raise ConfigError(f"agent.tools: unknown {unknown}; the tools are {', '.join(names)}")
    keep = set(tools or names) | {"submit"}
    return [s for s in SCHEMAS if s["function"]["name"] in keep] + [NEXT_STEP]
