"""Prompts are data: markdown files in avo/agent/prompts/, filled with string.Template (${name})."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from string import Template

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


@cache
def text(name: str) -> str:
    return (PROMPTS_DIR / f"{name}.md").read_text(encoding="utf-8")


def render(name: str, **values) -> str:
    """Fill a prompt; a placeholder without a value is an error, not a silent blank."""
    return Template(text(name)).substitute(**{k: str(v) for k, v in values.items()})


@cache
def sections(name: str) -> dict[str, str]:
    """`## key` sections of a prompt file."""
    parts = re.split(r"^## (\w+)\s*$", text(name), flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def feedback(key: str, **values) -> str:
    return Template(sections("feedback")[key]).substitute(**{k: str(v) for k, v in values.items()})


def lines(name: str) -> list[str]:
    return [ln.strip() for ln in text(name).splitlines() if ln.strip() and not ln.startswith("#")]
