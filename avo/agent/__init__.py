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


def check(a) -> None:
    """Cross-field rules of the agent group, whatever its kind (avo.config.validate runs them before a launch
    writes or submits anything); one line per problem, raised as ConfigError."""
    from avo.errors import ConfigError

    if a.kind not in ("mutation", "llm", "external"):
        raise ConfigError(f"agent.kind={a.kind!r}: use mutation, llm or external")
    if a.kind == "mutation":
        if a.max_changes < 1 or a.max_tries < 1 or a.ahead < 0:
            raise ConfigError("agent.max_changes and agent.max_tries must be >= 1, agent.ahead >= 0")
        return
    from avo.agent.tools import NAMES

    unknown = sorted(set(a.tools) - set(NAMES))
    if unknown:
        raise ConfigError(f"agent.tools: unknown {unknown}; the tools are {', '.join(NAMES)}")
    b = a.budget
    positive = ("max_seconds", "max_tool_calls", "idle_seconds", "tool_output_chars") if a.kind == "external" else (
        "max_turns", "max_tokens", "max_seconds", "request_timeout_s", "tool_output_chars")
    for name in positive:
        if b[name] <= 0:
            raise ConfigError(f"agent.budget.{name}={b[name]} must be positive")
    if a.kind == "external":
        return
    s, srv = a.sampling, a.server
    if srv.mode not in ("managed", "external"):
        raise ConfigError(f"agent.server.mode={srv.mode!r}: use managed or external")
    if b.retries < 0 or srv.max_restarts < 0:
        raise ConfigError("agent.budget.retries and agent.server.max_restarts must be >= 0")
    if s.tool_choice not in ("auto", "required"):
        raise ConfigError(f"agent.sampling.tool_choice={s.tool_choice!r}: use auto or required")
    if s.max_tokens <= 0 or not 0 <= s.temperature <= 2 or not 0 < s.top_p <= 1:
        raise ConfigError("agent.sampling: max_tokens > 0, temperature in [0, 2], top_p in (0, 1]")
    if srv.mode == "managed" and srv.tensor_parallel_size > max(1, len(srv.gpus)):
        raise ConfigError(f"agent.server.tensor_parallel_size={srv.tensor_parallel_size} needs as many "
                          f"agent.server.gpus (got {list(srv.gpus)})")
