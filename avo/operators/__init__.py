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
