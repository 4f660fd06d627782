"""House rules a reviewer would otherwise check by hand: short modules, and prompts that are data the code uses."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "avo").rglob("*.py"))
PROMPTS = ROOT / "avo" / "agent" / "prompts"
MAX_LINES = 400
LOADERS = {"text", "render", "lines", "sections", "feedback"}  # avo.agent.render's functions


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (budget {MAX_LINES}); split it by what it owns"


def _placeholders(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", text))


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _prompt_calls() -> list[tuple[str, str, str | None, set[str] | None]]:
    """(where, loader, first argument if a literal, keyword names or None when **kwargs) of every render.X call."""
    calls = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "render"
                    and node.func.attr in LOADERS):
                continue
            arg = node.args[0] if node.args else None
            name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            keys = None if any(k.arg is None for k in node.keywords) else {k.arg for k in node.keywords}
            calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.func.attr, name, keys))
    return calls


def test_every_prompt_file_is_used_and_every_used_prompt_exists():
    files = {p.stem for p in PROMPTS.glob("*.md")}
    calls = _prompt_calls()
    used = {name for _, fn, name, _ in calls if fn != "feedback" and name} | (
        {"feedback"} if any(fn == "feedback" for _, fn, _, _ in calls) else set())
    assert files, f"no prompt templates in {PROMPTS}"
    assert not used - files, f"code loads prompts that do not exist: {sorted(used - files)}"
    assert not files - used, f"prompt files nothing loads (delete them or use them): {sorted(files - used)}"


def test_rendered_prompts_get_exactly_their_placeholders():
    for where, fn, name, keys in _prompt_calls():
        if fn != "render" or keys is None:
            continue
        wanted = _placeholders((PROMPTS / f"{name}.md").read_text())
        assert keys == wanted, (f"{where}: render({name!r}) passes {sorted(keys - wanted)} that {name}.md does not "
                                f"use and lacks {sorted(wanted - keys)}")


def test_every_feedback_section_is_used_with_its_placeholders():
    sections = _sections((PROMPTS / "feedback.md").read_text())
    literals = {n.value for p in MODULES for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    unused = [k for k in sections if k not in literals]
    assert not unused, f"feedback.md sections no code names: {unused}"
    for where, fn, key, keys in _prompt_calls():
        if fn != "feedback":
            continue
        if key is None:  # a key chosen at run time (its literals are counted above)
            continue
        assert key in sections, f"{where}: feedback({key!r}) has no `## {key}` section in feedback.md"
        wanted = _placeholders(sections[key])
        assert keys is None or keys == wanted, f"{where}: feedback({key!r}) gets {sorted(keys)}, wants {sorted(wanted)}"


def test_every_dependency_is_imported_by_the_package():
    """A dependency nothing in avo/ imports is weight every install carries (tqdm was one; cuda-core is the
    tests' only, so it is in the dev extra)."""
    import tomllib

    modules = {"hydra-core": "hydra", "cuda-bindings": "cuda.bindings", "cuda-pathfinder": "cuda.pathfinder",
               "pyelftools": "elftools"}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in deps]
    imported = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
    unused = [n for n in names if not any(m == modules.get(n, n.replace("-", "_")) or
                                          m.startswith(modules.get(n, n.replace("-", "_")) + ".") for m in imported)]
    assert not unused, f"dependencies that nothing in avo/ imports: {unused}"


# the two pages their owners write, from the README sections that moved there
WRITTEN_ALONGSIDE = {"docs/harness.md", "docs/external-agent.md"}


def test_the_readme_is_a_front_page_whose_commands_are_those_ci_and_set_up_run():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120, "the README is a front page: the reference goes to docs/"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci and "```bash\nbash scripts/test.sh\n```" in text
    assert "```bash\nbash scripts/setup.sh && python3 -m avo.launch harness=compile search=smoke\n```" in text
    for stale in ("at least as fast", "at least as high", "experiment"):
        assert stale not in text, stale


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and str(path.relative_to(ROOT)) not in WRITTEN_ALONGSIDE:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
