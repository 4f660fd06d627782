from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "avo").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_short(path):
    n = len(path.read_text().splitlines())
    assert n <= 400, f"{path.name} has {n} lines; split it by what each part owns"


def test_prompts_are_data_files():
    prompts = ROOT / "avo" / "agent" / "prompts"
    if prompts.exists():
        assert list(prompts.glob("*.md")), "prompt templates live in avo/agent/prompts/*.md"
