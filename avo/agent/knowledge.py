"""Search over the knowledge base: BM25 over markdown sections, offline, no embeddings.

Documents: avo/agent/knowledge/*.md (written for this project), the kernel contract and notes in
kernels_cuda/ (indexed where they are, never copied), any extra folders from the config, and the
run's own lessons (what each committed version changed and gained), derived from the lineage.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from avo.paths import KERNELS_DIR
from avo.types import Version

KNOWLEDGE_DIR = Path(__file__).resolve().parent / "knowledge"
REPO_DOCS = [KERNELS_DIR / n for n in ("CONTRACT.md", "NOTES.md")]

_TOKEN = re.compile(r"[a-z_][a-z0-9_.]*|\d+")
_STOP = frozenset("a an the of to in on for and or is are be by with as at it this that from".split())


@dataclass(frozen=True)
class Passage:
    doc: str
    title: str
    text: str


def tokens(text: str) -> list[str]:
    out = []
    for t in _TOKEN.findall(text.lower()):
        t = t.strip(".")
        if t and t not in _STOP:
            out.append(t)
            if "_" in t or "." in t:  # mbarrier.try_wait -> also mbarrier, try_wait
                out += [p for p in re.split(r"[_.]", t) if p and p not in _STOP]
    return out


def split_markdown(doc: str, text: str, max_chars: int = 1500) -> list[Passage]:
    """Sections by heading; long sections split at blank lines into pieces of at most max_chars."""
    out, title, buf = [], doc, []

    def flush():
        body = "\n".join(buf).strip()
        buf.clear()
        if not body:
            return
        piece = ""
        for para in re.split(r"\n\s*\n", body):
            if piece and len(piece) + len(para) > max_chars:
                out.append(Passage(doc, title, piece.strip()))
                piece = ""
            piece += para + "\n\n"
        if piece.strip():
            out.append(Passage(doc, title, piece.strip()))

    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"#{1,4} ", line):
            flush()
            title = line.lstrip("#").strip()
            continue
        buf.append(line)
    flush()
    return out


def lessons(history: list[Version]) -> str:
    """The lineage's own lessons, one section per committed version."""
    if len(history) < 2:
        return ""
    parts = ["# Lessons of this run's lineage\n"]
    for prev, v in zip(history, history[1:], strict=False):
        # what its commit proved, timed side by side with the version before it (scores of two evaluations
        # are not comparable)
        gain = (f"x{v.ratio:.4f} [{v.ratio_lo:.4f}, {v.ratio_hi:.4f}] over v{prev.version} timed side by side"
                if v.ratio is not None else "not timed side by side")
        parts.append(f"## v{v.version}: {v.message or '(no message)'}\nCommitted as v{v.version}, {gain}. "
                     f"Change: {v.message or 'not described'}.\n")
    return "\n".join(parts)


class KnowledgeBase:
    k1, b = 1.5, 0.75

    def __init__(self, extra_dirs: list[str | Path] = (), history: list[Version] = ()):
        files = sorted(KNOWLEDGE_DIR.glob("*.md")) + [p for p in REPO_DOCS if p.exists()]
        for d in extra_dirs:
            d = Path(d).expanduser()
            if not d.is_dir():
                raise FileNotFoundError(f"knowledge folder {d} does not exist (agent.knowledge_dirs)")
            files += sorted(d.glob("*.md"))
        self.passages: list[Passage] = []
        for f in files:
            self.passages += split_markdown(f.name, f.read_text(encoding="utf-8"))
        text = lessons(list(history))
        if text:
            self.passages += split_markdown("lineage", text)
        self._index()

    def _index(self) -> None:
        self.docs = [Counter(tokens(p.title + " " + p.title + " " + p.text)) for p in self.passages]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avg = sum(self.lengths) / max(1, len(self.lengths))
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def search(self, query: str, k: int = 4) -> list[tuple[float, Passage]]:
        q = set(tokens(query))
        scored = []
        for p, c, n in zip(self.passages, self.docs, self.lengths, strict=True):
            s = 0.0
            for t in q:
                f = c.get(t, 0)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg))
            if s > 0:
                scored.append((s, p))
        scored.sort(key=lambda x: -x[0])
        return scored[:k]

    def render(self, query: str, k: int = 4) -> str:
        hits = self.search(query, k)
        if not hits:
            return (f"nothing in the knowledge base matches {query!r}; try other words "
                    "(e.g. wgmma, TMA, mbarrier, online softmax, causal mask, registers)")
        return "\n\n".join(f"[{p.doc} / {p.title}] (score {s:.1f})\n{p.text}" for s, p in hits)
