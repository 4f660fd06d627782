"""The supervisor: on a stall, review the trajectory and redirect the agent.

The LLM is asked for a JSON object with several distinct directions (or a reset to the best version).
Its reply is parsed leniently (JSON, then a list); anything unusable falls back to directions from
prompts/directions.md that were not given before, so every intervention yields usable text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from avo.agent import render
from avo.agent.client import LlmError
from avo.agent.memory import Notes
from avo.agent.transcript import Transcript, transcript_path
from avo.types import Redirect, StepContext

MIN_CHARS, MAX_CHARS = 15, 600
# Structured output where the endpoint supports it (vLLM does); the lenient parser still runs on the text.
REPLY_SCHEMA = {"type": "json_schema", "json_schema": {"name": "supervisor", "schema": {
    "type": "object", "required": ["action", "exhausted", "directions"], "properties": {
        "action": {"type": "string", "enum": ["redirect", "reset"]}, "exhausted": {"type": "string"},
        "directions": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 6}}}}}


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def parse_directions(reply: str) -> tuple[str, list[str]]:
    """(action, directions) from the supervisor's reply; directions may be empty when unusable."""
    action, items = "redirect", []
    for m in re.finditer(r"\{.*\}", reply or "", re.S):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            if str(obj.get("action", "")).strip().lower() == "reset":
                action = "reset"
            d = obj.get("directions")
            items = [str(x) for x in d] if isinstance(d, list) else [str(d)] if isinstance(d, str) else []
            break
    if not items:  # a plain list: "1. ...", "- ..."
        items = [m.group(1) for m in re.finditer(r"^\s*(?:\d+[.)]|[-*•])\s+(.+)$", reply or "", re.M)]
    return action, items


def clean(items: list[str], previous: list[str], n: int) -> list[str]:
    """Keep distinct, sensible directions that were not given before; at most n."""
    seen = {_norm(p) for p in previous}
    out = []
    for it in items:
        it = " ".join(str(it).split()).strip(" \"'")
        key = _norm(it)
        if not (MIN_CHARS <= len(it) <= MAX_CHARS) or not key or key in seen:
            continue
        if len(set(key.split())) < 3:  # "optimize", "make it faster"
            continue
        seen.add(key)
        out.append(it)
    return out[:n]


def _proved(v) -> str:
    if v.ratio is not None:
        return f"x{v.ratio:.4f} over its parent side by side ({v.score:.1f} TFLOPS in its own evaluation)"
    return f"{v.score:.1f} TFLOPS" if v.score is not None else "unranked"


def _attempt_line(a) -> str:
    score = f" {a.score:.1f}" if a.score is not None else ""
    error = " | " + a.error.splitlines()[0][:200] if a.error else ""
    step, _, attempt = a.candidate_id.partition(".")
    return f"step {int(step)}.{int(attempt)}: {a.decision}/{a.status.value}{score} - {a.message[:150]}{error}"


class Supervisor:
    def __init__(self, cfg, run_dir: Path, client, notes: Notes, n_directions: int = 3):
        self.cfg, self.run_dir, self.client, self.notes = cfg, Path(run_dir), client, notes
        self.n = n_directions

    @staticmethod
    def previous(ctx: StepContext) -> list[str]:
        """The directions this island was given before (its StepContext's directives, one per line)."""
        out = []
        for d in ctx.directions:
            out += [ln.split(". ", 1)[1] for ln in d.splitlines() if re.match(r"^\d+\. ", ln)]
        return out

    @staticmethod
    def trajectory(ctx: StepContext) -> tuple[str, str]:
        """The island's versions (what each proved, side by side) and its latest attempts, as the prompt shows them."""
        versions = "\n".join(f"v{v.version}: {_proved(v)} - {(v.message or '')[:200]}" for v in ctx.history[-15:])
        return versions, "\n".join(_attempt_line(a) for a in ctx.recent) or "(none)"

    def review(self, ctx: StepContext, reason: str) -> Redirect:
        previous = self.previous(ctx)
        action, directions, source = "redirect", [], "rules"
        cost = Redirect("")
        if self.cfg.llm_supervisor:
            action, directions = self._ask(ctx, reason, previous, cost)
            source = "llm" if directions else "rules (the LLM's reply was unusable)"
        if len(directions) < 2:
            pool = self._fallback(ctx, previous + directions)
            directions += clean(pool, previous + directions, self.n - len(directions))
            if len(directions) < 2:  # every fallback was given before: repeat some rather than say nothing
                directions += clean(pool, directions, self.n - len(directions))
        if action == "reset":
            self.notes.reset(ctx.step, f"Restart from the best version v{ctx.best.version}; earlier notes set "
                                       f"aside ({reason}).")
        head = (f"Supervisor ({source}) after: {reason}. "
                + (f"Restart from the best version v{ctx.best.version}. " if action == "reset" else "")
                + "Pick one of these directions, preferring one not yet tried:")
        cost.directive = head + "\n" + "\n".join(f"{i}. {d}" for i, d in enumerate(directions, 1))
        return cost

    def _ask(self, ctx: StepContext, reason: str, previous: list[str], cost: Redirect) -> tuple[str, list[str]]:
        """The LLM's action and directions; what the requests cost is added to `cost`."""
        versions, attempts = self.trajectory(ctx)
        prompt = render.render("supervisor", reason=reason, versions=versions, attempts=attempts, n=self.n,
                               previous="\n".join(f"- {p}" for p in previous[-12:]) or "(none)")
        messages = [{"role": "user", "content": prompt}]
        with Transcript(transcript_path(self.run_dir, ctx.step, 0, kind="supervisor")) as tr:
            tr.event("request", new=messages, n_messages=1)
            reply = None
            cost.model = self.client.model
            for fmt in (REPLY_SCHEMA, None):  # an endpoint without structured output gets a plain request
                cost.llm_calls += 1
                try:
                    reply = self.client.chat(messages, temperature=self.cfg.sampling.temperature,
                                             max_tokens=self.cfg.budget.supervisor_tokens, response_format=fmt)
                    break
                except LlmError as e:
                    tr.event("note", kind="llm_error", error=str(e), response_format=fmt is not None)
            if reply is None:
                return "redirect", []
            cost.prompt_tokens, cost.completion_tokens = reply.prompt_tokens, reply.completion_tokens
            cost.latency_s = reply.latency_s
            tr.event("response", message=reply.message, finish_reason=reply.finish_reason,
                     prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                     latency_s=round(reply.latency_s, 3))
            action, items = parse_directions(reply.content)
            directions = clean(items, previous, self.n)
            tr.event("end", action=action, directions=directions, parsed=len(items))
            return action, directions

    def _fallback(self, ctx: StepContext, exclude: list[str]) -> list[str]:
        pool = render.lines("directions")
        fresh = [d for d in pool if _norm(d) not in {_norm(e) for e in exclude}] or pool
        ctx.rng.shuffle(fresh)
        return fresh
