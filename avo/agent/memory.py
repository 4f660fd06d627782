"""The agent's notes: persistent across steps and restarts, one markdown file under the run directory.
Every worker of a search (search.workers) shares it; appends hold a file lock.

Each note is appended with the step it was written in; the prompt shows the most recent ones
(what fits in `show_chars`) so old notes age out of view without being lost.
"""
from __future__ import annotations

import fcntl
import re
from datetime import datetime, timezone
from pathlib import Path

_HEADER = re.compile(r"^## step (\d+)", re.M)
RESET = "supervisor reset"


class Notes:
    def __init__(self, run_dir: str | Path, show_chars: int = 6000, max_note_chars: int = 2000):
        self.path = Path(run_dir) / "agent" / "notes.md"
        self.show_chars, self.max_note_chars = show_chars, max_note_chars

    def read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def recent(self) -> str:
        """The newest notes that fit in show_chars, whole entries only."""
        text = self.read()
        cut = text.rfind(f"): {RESET}\n")  # notes before a reset are set aside (still in the file)
        if cut >= 0:
            text = text[text.rfind("## step", 0, cut):]
        if len(text) <= self.show_chars:
            return text.strip()
        starts = [m.start() for m in _HEADER.finditer(text)]
        for s in starts:
            if len(text) - s <= self.show_chars:
                return f"({len(starts)} notes; older ones omitted)\n" + text[s:].strip()
        return text[-self.show_chars:].strip()

    def reset(self, step: int, why: str) -> None:
        """Set earlier notes aside: the agent restarts from the best version with only this entry."""
        self._append(f"## step {step} ({self._stamp()}): {RESET}\n{why.strip()}\n\n")

    @staticmethod
    def _stamp() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def _append(self, entry: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            # search.workers append from several threads (and a resumed job may overlap a dying one): one at a time
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(entry)
            f.flush()

    def add(self, step: int, text: str) -> str:
        text = text.strip()
        if not text:
            raise ValueError("the note is empty")
        if len(text) > self.max_note_chars:
            text = text[: self.max_note_chars] + " [truncated]"
        self._append(f"## step {step} ({self._stamp()})\n{text}\n\n")
        return f"note saved ({len(text)} characters)"
