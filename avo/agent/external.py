"""An outside agent as the variation operator (agent=external): any MCP client works the step.

For each `propose` the search opens the step on its MCP endpoint (avo.agent.mcp_server) and waits, under
the budget, until the agent submits. The agent gets the built-in agent's workbench (the same tool
implementations) and the step's context; nothing it says is trusted: the harness evaluates the submitted
source like any other. An agent that disconnects, goes silent, runs out of budget or never submits a
usable source leaves an `invalid` attempt, and the search goes on.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from avo import interrupt
from avo.agent.desk import OpenStep, StepDesk, offered_schemas
from avo.agent.knowledge import KnowledgeBase
from avo.agent.mcp_server import HttpEndpoint, instructions
from avo.agent.memory import Notes
from avo.agent.operator import step_prompt
from avo.agent.supervisor import Supervisor
from avo.agent.tools import Workbench
from avo.agent.transcript import Transcript, transcript_path
from avo.lineage import sha256
from avo.types import Proposal, ProposalError, Redirect, StepContext


class ExternalOperator:
    name = "external"

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.model = cfg.model
        self.schemas = offered_schemas(list(cfg.tools))
        self.offered = tuple(s["function"]["name"] for s in self.schemas if s["function"]["name"] != "next_step")
        self.notes = Notes(self.run_dir)
        # no LLM of ours to ask: stalls get the rule-based directions, which the agent reads in next_step
        self.supervisor = Supervisor(SimpleNamespace(llm_supervisor=False), self.run_dir, None, self.notes)
        self.desk = StepDesk()
        self.endpoint = HttpEndpoint(self.desk, self.schemas, self.run_dir, cfg.port, cfg.token_file)
        self.url = self.endpoint.start()
        print(f"[avo] MCP endpoint {self.url} (token in {self.endpoint.token_file}); stdio: {sys.executable} -m "
              f"avo.agent.mcp_server --run-dir {self.run_dir}", flush=True)
        self._last_sha: str | None = None

    # -- Operator protocol -----------------------------------------------------------------------
    def propose(self, ctx: StepContext) -> Proposal:
        path = transcript_path(self.run_dir, ctx.step, ctx.attempt)
        b = self.cfg.budget
        bench = Workbench(ctx, self.notes, KnowledgeBase(list(self.cfg.knowledge_dirs), ctx.history),
                          b.tool_output_chars, self.offered)
        context = self.verdict(ctx) + step_prompt(
            ctx, self.notes.recent(), f"{b.max_tool_calls} tool calls, {b.max_seconds:.0f} s, at most "
                                      f"{b.idle_seconds:.0f} s between calls", self.cfg.source_in_prompt)
        with Transcript(path) as tr:
            tr.event("start", step=ctx.step, attempt=ctx.attempt, model=self.model, best_version=ctx.best.version,
                     source=bench.source, source_sha=sha256(bench.source), tools=[*self.offered, "next_step"],
                     endpoint=self.url, messages=[{"role": "system", "content": instructions()},
                                                  {"role": "user", "content": context}])
            s = OpenStep(ctx, bench, tr, context, b.max_seconds, b.max_tool_calls, b.idle_seconds)
            self.desk.open(s)
            # a call in flight when the step ends runs the harness, which kills its worker after timeout_s
            grace = ctx.bench.timeout_s + 30.0
            try:
                stop = self.desk.wait(s, grace)
            except interrupt.STOPS as e:  # the search stops: the agent's next call hears why
                self.desk.interrupt(s, interrupt.reason(e))
                raise
            return self._finish(s, stop, path)

    def redirect(self, ctx: StepContext, reason: str) -> Redirect:
        return self.supervisor.review(ctx, reason)

    def close(self) -> None:
        self.desk.finish("the search stopped")
        self.endpoint.stop()

    # -- helpers ---------------------------------------------------------------------------------
    def _finish(self, s: OpenStep, stop: str, path: Path) -> Proposal:
        bench = s.bench
        model = s.model or self.model or s.client or "unknown"
        meta = {"transcript": str(path.relative_to(self.run_dir)), "client": s.client, "tool_calls": bench.calls,
                "tool_errors": bench.errors, "stop": stop, "endpoint": self.url}
        proposal = Proposal("", model=model, meta=meta)
        if bench.submitted is None:
            meta["outcome"] = "invalid"
            reason = f"no candidate from the external agent: {stop}"
            s.tr.event("end", outcome="invalid", reason=reason, client=s.client, model=model)
            raise ProposalError(reason, proposal)
        proposal.source, proposal.message = bench.submitted
        meta["outcome"] = "submitted"
        self._last_sha = sha256(proposal.source)
        s.tr.event("end", outcome="submitted", source_sha=self._last_sha, message=proposal.message, reason=stop,
                   client=s.client, model=model)
        return proposal

    def verdict(self, ctx: StepContext) -> str:
        """What the harness said about the previous submission (its island's recent attempts, in the context)."""
        if self._last_sha is None:
            return ""
        mine = [a for a in ctx.recent if sha256(a.source) == self._last_sha]
        if not mine:
            return ""
        a = mine[-1]
        score = f", {a.score:.1f} TFLOPS" if a.score is not None else ""
        version = f" as v{a.version}" if a.version is not None else ""
        error = f"\n{a.error.strip()[:1500]}" if a.error else ""
        return (f"Verdict on your submission {a.candidate_id}: {a.decision}{version} "
                f"(status {a.status.value}{score}).{error}\n\n")
