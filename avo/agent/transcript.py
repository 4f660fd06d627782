"""JSONL transcripts beside the lineage: <run_dir>/transcripts/step{step:05d}-a{attempt:02d}.jsonl.

One event per line, flushed as it happens, so a killed step still leaves its record:
  start        the step, the model, the starting source (full text), tools offered
  request      the messages appended since the previous request, sampling
  response     the assistant message, tokens, latency, finish reason
  tool_call    name, raw arguments;  tool_result  the text returned, and the source hash after it
  note         anything else worth knowing (retries, budget ends, context compaction)
  end          the outcome: submitted source hash and message, or the error
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def transcript_path(run_dir: str | Path, step: int, attempt: int, kind: str = "step") -> Path:
    return Path(run_dir) / "transcripts" / f"{kind}{step:05d}-a{attempt:02d}.jsonl"


class Transcript:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a retried attempt (after a crash) starts its transcript afresh
        self._f = open(self.path, "w", encoding="utf-8")
        self.t0 = time.time()

    def event(self, event: str, /, **data: Any) -> None:
        rec = {"event": event, "t": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 3), **data}
        self._f.write(json.dumps(rec, default=str, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "Transcript":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(path: str | Path) -> list[dict]:
    """Events of a transcript; a truncated last line (a killed step) is dropped, other damage is an error."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    events = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON") from None
    return events
