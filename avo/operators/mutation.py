"""The classic evolutionary operator: mutate the tunables a kernel declares in its source.

This is what the AVO paper replaced with an agent; it is the baseline and the
operator that runs with no LLM.
"""
from __future__ import annotations

from avo.contract import set_tunables, tunables
from avo.lineage import sha256
from avo.types import Proposal, ProposalError, Redirect, StepContext


class MutationOperator:
    name = "mutation"
    model = ""

    def __init__(self, cfg):
        self.max_changes = int(cfg.max_changes)
        self.max_tries = int(cfg.max_tries)
        self.boost = 0  # extra changes per candidate after a supervisor redirect
        # proposals a worker may draw ahead (avo.workers): one depends on the head and the tried set, not on the
        # last verdict, so they can be compiled while another is timed
        self.ahead = int(cfg.ahead)

    def propose(self, ctx: StepContext) -> Proposal:
        source = ctx.best.source
        knobs = {n: t for n, t in tunables(source).items() if len(t.choices) > 1}
        if not knobs:
            raise ProposalError("the kernel declares no tunables with two or more choices "
                                "(`#define NAME value  // @tunable a b c`)")
        names = sorted(knobs)
        seen = set(ctx.tried) | {sha256(a.source) for a in ctx.failures}
        for _ in range(self.max_tries):
            k = ctx.rng.randint(1, min(len(names), self.max_changes + self.boost))
            picked = ctx.rng.sample(names, k)
            values = {n: ctx.rng.choice([c for c in knobs[n].choices if c != knobs[n].value]) for n in picked}
            candidate = set_tunables(source, values)
            if sha256(candidate) not in seen:
                msg = ", ".join(f"{n} {knobs[n].value}->{v}" for n, v in sorted(values.items()))
                return Proposal(candidate, message=f"mutate {msg}")
        raise ProposalError(f"no untried variant of the best version in {self.max_tries} draws "
                            f"({len(names)} tunables): the neighbourhood is exhausted")

    def redirect(self, ctx: StepContext, reason: str) -> Redirect:
        # A mutation operator cannot reason about the trajectory; widen the jumps instead.
        self.boost += 1
        return Redirect(f"{reason}: widening mutations to up to {self.max_changes + self.boost} tunables "
                        "per candidate")

    def close(self) -> None:
        pass
