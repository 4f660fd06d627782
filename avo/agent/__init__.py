"""The agentic variation operator: an LLM served by vLLM (or any OpenAI-compatible endpoint) with tools."""
from __future__ import annotations

import os
from pathlib import Path

from avo.types import Problem


def make_llm_operator(agent_cfg, run_dir: Path, problem: Problem):
    """Start (or reach) the LLM endpoint and return the operator; `close()` stops a managed server."""
    from avo.agent.client import ChatClient
    from avo.agent.operator import LlmOperator
    from avo.agent.server import ServerError, make_server

    check(agent_cfg)
    s = agent_cfg.server
    api_key = ""
    if s.api_key_env:
        api_key = os.environ.get(s.api_key_env, "")
        if not api_key:
            raise ServerError(f"agent.server.api_key_env={s.api_key_env}: that environment variable is not set")
    if not agent_cfg.model:
        raise ServerError(f"agent={agent_cfg.name} names no model (agent.model)")
    server = make_server(s, agent_cfg.model, Path(run_dir) / "agent", api_key)
    base_url = server.start()
    try:
        client = ChatClient(base_url, agent_cfg.model, api_key, timeout_s=agent_cfg.budget.request_timeout_s,
                            retries=agent_cfg.budget.retries, on_failure=server.ensure_alive)
        return LlmOperator(agent_cfg, Path(run_dir), client, server)
    except BaseException:
        server.stop()
        raise


def check(cfg) -> None:
    """Cross-field rules of an llm agent config; one line per problem, raised as ConfigError."""
    from avo.config import ConfigError

    b, s = cfg.budget, cfg.sampling
    for name in ("max_turns", "max_tokens", "max_seconds", "request_timeout_s", "tool_output_chars"):
        if b[name] <= 0:
            raise ConfigError(f"agent.budget.{name}={b[name]} must be positive")
    if b.retries < 0 or cfg.server.max_restarts < 0:
        raise ConfigError("agent.budget.retries and agent.server.max_restarts must be >= 0")
    if s.tool_choice not in ("auto", "required"):
        raise ConfigError(f"agent.sampling.tool_choice={s.tool_choice!r}: use auto or required")
    if s.max_tokens <= 0 or not 0 <= s.temperature <= 2 or not 0 < s.top_p <= 1:
        raise ConfigError("agent.sampling: max_tokens > 0, temperature in [0, 2], top_p in (0, 1]")
    if cfg.server.mode == "managed" and cfg.server.tensor_parallel_size > max(1, len(cfg.server.gpus)):
        raise ConfigError(f"agent.server.tensor_parallel_size={cfg.server.tensor_parallel_size} needs as many "
                          f"agent.server.gpus (got {list(cfg.server.gpus)})")
