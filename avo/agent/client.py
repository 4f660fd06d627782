"""OpenAI-compatible chat with retries, timeouts and token/latency accounting."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import openai


class LlmError(RuntimeError):
    """The endpoint kept failing after the configured retries."""


class ContextOverflow(LlmError):
    """The conversation no longer fits the model's context window."""


@dataclass
class Reply:
    message: dict[str, Any]          # the assistant message, as it goes back into the conversation
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, r: Reply) -> None:
        self.calls += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.seconds += r.latency_s

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_OVERFLOW_HINTS = ("maximum context length", "context length", "too many tokens", "prompt is too long",
                   "max_model_len", "exceeds the model")


class ChatClient:
    """One endpoint and one model; `on_failure` (e.g. restart a dead server) runs before each retry."""

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout_s: float = 600.0,
                 retries: int = 3, on_failure: Callable[[], None] | None = None, backoff_s: float = 2.0):
        self.base_url, self.model = base_url, model
        self.retries, self.backoff_s = retries, backoff_s
        self.on_failure = on_failure
        for name in ("httpx", "httpx2"):  # one INFO line per request would drown the search's own progress
            logging.getLogger(name).setLevel(logging.WARNING)
        self.api = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | None = None,
             **sampling: Any) -> Reply:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            kwargs["tools"] = tools
            kwargs["tool_choice"] = tool_choice or "auto"
        extra = sampling.pop("extra_body", None)
        if extra:
            kwargs["extra_body"] = dict(extra)
        kwargs.update({k: v for k, v in sampling.items() if v is not None})
        last = ""
        for attempt in range(1, self.retries + 2):
            t0 = time.monotonic()
            try:
                resp = self.api.chat.completions.create(**kwargs)
                return self._reply(resp, time.monotonic() - t0, attempt)
            except openai.BadRequestError as e:
                text = str(e)
                if any(h in text.lower() for h in _OVERFLOW_HINTS):
                    raise ContextOverflow(_short(text)) from None
                raise LlmError(f"the server rejected the request: {_short(text)}") from None
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                    openai.RateLimitError, openai.APIStatusError) as e:
                if isinstance(e, openai.APIStatusError) and e.status_code in (401, 403, 404):
                    raise LlmError(f"{self.base_url} answered {e.status_code}: {_short(str(e))}") from None
                last = f"{type(e).__name__}: {_short(str(e))}"
            except (ValueError, KeyError, TypeError, IndexError) as e:  # a malformed response body
                last = f"malformed response: {type(e).__name__}: {_short(str(e))}"
            if attempt <= self.retries:
                if self.on_failure:
                    self.on_failure()
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 60.0))
        raise LlmError(f"{self.base_url}: {self.retries + 1} attempts failed; last: {last}")

    @staticmethod
    def _reply(resp, latency: float, attempt: int) -> Reply:
        if not resp.choices:
            raise ValueError("response without choices")
        choice = resp.choices[0]
        msg = choice.message
        calls = [{"id": c.id or f"call_{i}", "type": "function",
                  "function": {"name": c.function.name or "", "arguments": c.function.arguments or ""}}
                 for i, c in enumerate(msg.tool_calls or [])]
        content = msg.content or ""
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        usage = resp.usage
        return Reply(message, content, calls, choice.finish_reason or "", getattr(usage, "prompt_tokens", 0) or 0,
                     getattr(usage, "completion_tokens", 0) or 0, latency, attempt)


def _short(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
