"""The agentic variation operator: one tool-calling conversation per proposal.

The model edits a working copy of the best version, compiles, tests and benchmarks it through the
harness, and submits. Malformed calls, failed edits, empty or cut-off replies, context overflow and
server errors are fed back or retried and written to the transcript; none of them escapes as a crash.
If the budget ends without a submission, the last working copy that compiled is submitted instead,
or the step is recorded as invalid with the reason.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from avo.agent import render
from avo.agent.client import ChatClient, ContextOverflow, LlmError, Reply, Usage
from avo.agent.edits import extract_source, parse_blocks
from avo.agent.knowledge import KnowledgeBase
from avo.agent.memory import Notes
from avo.agent.supervisor import Supervisor
from avo.agent.tools import NAMES, SCHEMAS, Workbench, lineage_text
from avo.agent.transcript import Transcript, transcript_path
from avo.lineage import sha256
from avo.types import Proposal, ProposalError, Redirect, StepContext

_TEXT_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


@dataclass
class Budget:
    max_turns: int
    max_tokens: int
    max_seconds: float

    def exhausted(self, turns: int, tokens: int, seconds: float) -> str | None:
        if turns >= self.max_turns:
            return f"turn budget used up ({turns} of agent.budget.max_turns={self.max_turns})"
        if tokens >= self.max_tokens:
            return f"token budget used up ({tokens} of agent.budget.max_tokens={self.max_tokens})"
        if seconds >= self.max_seconds:
            return f"time budget used up ({seconds:.0f} s of agent.budget.max_seconds={self.max_seconds:.0f})"
        return None

    def left(self, turns: int, tokens: int, seconds: float) -> float:
        """The smallest remaining fraction of the three budgets."""
        return min(1 - turns / self.max_turns, 1 - tokens / self.max_tokens, 1 - seconds / self.max_seconds)


def text_tool_calls(content: str) -> list[tuple[str, dict | str]]:
    """Tool calls a model wrote as text (hermes <tool_call> tags or a bare JSON object)."""
    found = []
    bodies = _TEXT_CALL.findall(content) or ([content.strip()] if content.strip().startswith("{") else [])
    for body in bodies:
        try:
            obj = json.loads(body)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            found.append((obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    return found


def compact(messages: list[dict], keep_last: int = 4) -> bool:
    """Shrink old tool results and long assistant texts to fit the context; False if nothing is left to cut."""
    changed = False
    tool_idx = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    for i in tool_idx[:-keep_last] if len(tool_idx) > keep_last else []:
        if len(messages[i]["content"]) > 200:
            messages[i] = {**messages[i], "content": messages[i]["content"][:150] + " [elided to fit the context]"}
            changed = True
    for i, m in enumerate(messages[2:-2], 2):
        if m["role"] == "assistant" and len(m.get("content") or "") > 1000:
            messages[i] = {**m, "content": m["content"][:500] + " [elided]"}
            changed = True
    if not changed and "```cuda" in messages[1]["content"]:
        # last resort: drop the source from the first message; the model can view it
        head = messages[1]["content"].split("```cuda")[0]
        messages[1] = {**messages[1], "content": head + "(source omitted to fit the context: use view_source)"}
        changed = True
    return changed


class LlmOperator:
    name = "llm"

    def __init__(self, cfg, run_dir: Path, client: ChatClient, server=None):
        self.cfg, self.run_dir, self.client, self.server = cfg, Path(run_dir), client, server
        self.model = cfg.model
        self.budget = Budget(cfg.budget.max_turns, cfg.budget.max_tokens, cfg.budget.max_seconds)
        self.notes = Notes(self.run_dir)
        self.supervisor = Supervisor(cfg, self.run_dir, client, self.notes)
        unknown = sorted(set(cfg.tools) - set(NAMES))
        if unknown:
            raise ValueError(f"agent.tools: unknown {unknown}; the tools are {NAMES}")
        offered = set(cfg.tools or NAMES) | {"submit"}
        self.schemas = [s for s in SCHEMAS if s["function"]["name"] in offered]

    # -- Operator protocol -----------------------------------------------------------------------
    def propose(self, ctx: StepContext) -> Proposal:
        path = transcript_path(self.run_dir, ctx.step, ctx.attempt)
        with Transcript(path) as tr:
            return self._conversation(ctx, tr, path)

    def redirect(self, ctx: StepContext, reason: str) -> Redirect:
        return self.supervisor.review(ctx, reason)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    # -- the conversation ------------------------------------------------------------------------
    def sampling(self) -> dict:
        s = self.cfg.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed,
                "extra_body": dict(s.extra_body or {})}

    def _conversation(self, ctx: StepContext, tr: Transcript, path: Path) -> Proposal:
        kb = KnowledgeBase(list(self.cfg.knowledge_dirs), ctx.history)
        bench = Workbench(ctx, self.notes, kb, self.cfg.budget.tool_output_chars,
                          tuple(s["function"]["name"] for s in self.schemas))
        messages = [{"role": "system", "content": render.text("system")},
                    {"role": "user", "content": self.step_prompt(ctx)}]
        tr.event("start", step=ctx.step, attempt=ctx.attempt, model=self.model, best_version=ctx.best.version,
                 source=bench.source, source_sha=sha256(bench.source),
                 tools=[s["function"]["name"] for s in self.schemas], messages=messages)
        usage, turns, t0, sent, warned = Usage(), 0, time.monotonic(), 0, False
        llm_errors: list[str] = []
        stop = ""
        while bench.submitted is None:
            elapsed = time.monotonic() - t0
            stop = self.budget.exhausted(turns, usage.tokens, elapsed) or ""
            if not stop and ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                stop = "the search's deadline (search.max_hours) came"
            if stop:
                break
            if not warned and self.budget.left(turns, usage.tokens, elapsed) <= 0.2:
                warned = True
                messages.append({"role": "user", "content": render.feedback(
                    "budget_low", left=f"{self.budget.max_turns - turns} turns")})
            tr.event("request", new=messages[sent:], n_messages=len(messages), sampling=self.sampling())
            sent = len(messages)
            try:
                reply = self.client.chat(messages, self.schemas, self.cfg.sampling.tool_choice, **self.sampling())
            except ContextOverflow as e:
                tr.event("note", kind="context_overflow", error=str(e))
                llm_errors.append(f"context overflow: {e}")
                if compact(messages):
                    sent = 0
                    continue
                stop = f"the conversation no longer fits the context window ({e})"
                break
            except LlmError as e:
                tr.event("note", kind="llm_error", error=str(e))
                llm_errors.append(str(e))
                stop = f"LLM endpoint failed: {e}"
                break
            turns += 1
            usage.add(reply)
            tr.event("response", message=reply.message, finish_reason=reply.finish_reason,
                     prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                     latency_s=round(reply.latency_s, 3), attempts=reply.attempts)
            messages.append(reply.message)
            sent = len(messages)
            if reply.tool_calls:
                for call in reply.tool_calls:
                    fn = call["function"]
                    out = self._tool(bench, tr, fn["name"], fn["arguments"], call["id"], "tool")
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": out})
                    if bench.submitted:
                        break
            else:
                messages.append({"role": "user", "content": self._salvage(bench, tr, reply)})
        return self._finish(ctx, bench, tr, path, usage, turns, stop, llm_errors)

    def _tool(self, bench: Workbench, tr: Transcript, name: str, args, call_id: str, origin: str) -> str:
        tr.event("tool_call", id=call_id, name=name, arguments=args, origin=origin)
        t = time.monotonic()
        r = bench.call(name, args)
        tr.event("tool_result", id=call_id, name=name, arguments=args, ok=r.ok, text=r.text,
                 source_sha=sha256(bench.source), changed=r.source_changed, seconds=round(time.monotonic() - t, 3))
        return r.text

    def _salvage(self, bench: Workbench, tr: Transcript, reply: Reply) -> str:
        """A reply without tool calls: use what it holds if we can, and say what to do instead."""
        content = reply.content or ""
        calls = text_tool_calls(content)
        if calls:
            outs = [self._tool(bench, tr, n, a, f"text_{i}", "text") for i, (n, a) in enumerate(calls)]
            return "Your tool call was written as text; it was run. Results:\n" + "\n---\n".join(outs)
        blocks = parse_blocks(content)
        if blocks:
            args = [{"search": b.search, "replace": b.replace} for b in blocks]
            outs = [self._tool(bench, tr, "edit", a, f"text_edit_{i}", "text") for i, a in enumerate(args)]
            return render.feedback("text_edit_applied", result="\n".join(outs))
        src = extract_source(content)
        if src:
            out = self._tool(bench, tr, "rewrite", {"source": src}, "text_rewrite", "text")
            return render.feedback("text_rewrite_applied", result=out)
        key = "cut_off" if reply.finish_reason == "length" else "empty" if not content.strip() else "no_tool_call"
        tr.event("note", kind=key, content=content[:2000])
        bench.errors += 1
        return render.feedback(key)

    def _finish(self, ctx, bench: Workbench, tr: Transcript, path: Path, usage: Usage, turns: int, stop: str,
                llm_errors: list[str]) -> Proposal:
        meta = {"transcript": str(path.relative_to(self.run_dir)), "turns": turns, "tool_calls": bench.calls,
                "tool_errors": bench.errors, "llm_errors": llm_errors, "llm_seconds": round(usage.seconds, 3)}
        proposal = Proposal("", model=self.model, prompt_tokens=usage.prompt_tokens,
                            completion_tokens=usage.completion_tokens, llm_calls=usage.calls, meta=meta)
        if bench.submitted:
            proposal.source, proposal.message = bench.submitted
            meta["outcome"] = "submitted"
        else:
            fallback = next((s for s in (bench.checked_ok, bench.compiled_ok) if s and not bench.rejects(s)), None)
            if fallback is None:
                meta["outcome"] = "invalid"
                reason = (f"no candidate: {stop or 'the conversation ended'}; no changed source compiled "
                          f"({bench.errors} tool errors)")
                tr.event("end", outcome="invalid", reason=reason, usage=vars(usage))
                raise ProposalError(reason, proposal)
            meta["outcome"] = "auto_submitted"
            passed = "passed the test" if fallback is bench.checked_ok else "compiled"
            proposal.source = fallback
            proposal.message = f"(not submitted by the model: {stop}; the last working copy that {passed})"
        meta["stop"] = stop
        tr.event("end", outcome=meta["outcome"], source_sha=sha256(proposal.source), message=proposal.message,
                 reason=stop, usage=vars(usage))
        return proposal

    # -- the first message ---------------------------------------------------------------------
    def step_prompt(self, ctx: StepContext) -> str:
        b = self.cfg.budget
        return step_prompt(ctx, self.notes.recent(), f"{b.max_turns} replies, {b.max_tokens} tokens, "
                           f"{b.max_seconds:.0f} s", self.cfg.source_in_prompt)


def step_prompt(ctx: StepContext, notes: str, budget: str, source_in_prompt: bool) -> str:
    """The step's first message (shared by every operator that serves a step to a model)."""
    p, best = ctx.problem, ctx.best
    bench = ctx.bench
    shapes = ", ".join(s.key for s in p.bench)
    configs = "\n".join(f"  {c.key}: {c.tflops:.1f} TFLOPS" + (f" ({c.vs_cudnn:.3f} of cuDNN)" if c.vs_cudnn
                                                               else "") for c in best.configs if c.tflops)
    source = (f"\nThe working copy (v{best.version}):\n```cuda\n{best.source}\n```\n"
              if source_in_prompt else "\nView the working copy with `view_source`.\n")
    return render.render(
        "step", step=ctx.step, attempt=ctx.attempt,
        problem=f"{p.name}, heads_q={p.heads_q}, heads_kv={p.heads_kv} (group {p.group}), head_dim={p.head_dim};"
                f" benchmark shapes: {shapes}; {len(p.check)} correctness shapes",
        harness=f"{bench.name} ("
                + ("times kernels: scores are TFLOPS" if bench.ranks
                   else "checks correctness only: no timing, nothing is ranked" if bench.checks
                   else "compiles only: no kernel runs, so nothing is checked or ranked") + ")",
        budget=budget, lineage=lineage_text(ctx), best_version=best.version,
        best_score=f"{best.score:.1f} TFLOPS" if best.score is not None else "unranked",
        best_configs=configs, directive=f"\nSupervisor's directions:\n{ctx.directive}\n" if ctx.directive else "",
        notes=f"\nYour notes from earlier steps:\n{notes}\n" if notes else "", source=source)
