"""Variation operators: turn the lineage so far into the next candidate source."""
from __future__ import annotations

from pathlib import Path

from avo.types import Operator, Problem


def make_operator(agent_cfg, run_dir: Path, problem: Problem) -> Operator:
    if agent_cfg.kind == "mutation":
        from avo.operators.mutation import MutationOperator

        return MutationOperator(agent_cfg)
    if agent_cfg.kind == "llm":
        from avo.agent import make_llm_operator

        return make_llm_operator(agent_cfg, run_dir, problem)
    if agent_cfg.kind == "external":
        from avo.agent.external import ExternalOperator

        return ExternalOperator(agent_cfg, run_dir)
    raise ValueError(f"unknown agent kind {agent_cfg.kind!r} (mutation, llm or external)")


def make_operators(agent_cfg, run_dir: Path, problem: Problem, k: int = 1) -> list[Operator]:
    """k operators of one agent, each with its own conversation and working copy (search.workers).

    LLM operators share one endpoint and client: one managed vLLM server batches all k conversations,
    and only the first operator owns (and stops) it."""
    first = make_operator(agent_cfg, run_dir, problem)
    if k <= 1:
        return [first]
    if agent_cfg.kind == "mutation":
        from avo.operators.mutation import MutationOperator

        return [first] + [MutationOperator(agent_cfg) for _ in range(k - 1)]
    if agent_cfg.kind == "llm":
        from avo.agent.operator import LlmOperator

        return [first] + [LlmOperator(agent_cfg, Path(run_dir), first.client) for _ in range(k - 1)]
    first.close()
    raise ValueError(f"agent kind {agent_cfg.kind!r} serves one operator: use search.workers=1")
