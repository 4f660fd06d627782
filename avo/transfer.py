"""Transfer: what a new lineage seeded from another run takes along besides the source."""
from __future__ import annotations

import shutil
from pathlib import Path

KNOWLEDGE_FILES = ("agent/notes.md",)


def carry_knowledge(src_run: Path, dst_run: Path) -> list[Path]:
    """Copy the source run's agent notes (its persistent memory) into the new run, once."""
    copied = []
    for rel in KNOWLEDGE_FILES:
        src, dst = Path(src_run) / rel, Path(dst_run) / rel
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied
