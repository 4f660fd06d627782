"""What a person watching a run sees: one line per attempt and a closing summary."""
from __future__ import annotations

import sys

import polars as pl

from avo.lineage import ORIGINAL


def launcher_log(msg: str) -> None:
    """A line from the launcher (submissions, restarts, the server's URL)."""
    print(f"[avo.launcher] {msg}", flush=True)


def harness_log(msg: str) -> None:
    """A line from the harness about its GPUs (which it times on, one taken out)."""
    print(f"[avo.harness] {msg}", flush=True)


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    workers = 1  # more than one (search.workers): each line names the worker
    islands = 1  # more than one (search.islands): and its island

    def __init__(self, run_id: str, ranked: bool, stream=None):
        self.run_id, self.ranked = run_id, ranked
        self.stream = stream or sys.stdout

    def line(self, text: str) -> None:
        print(f"[avo {self.run_id}] {text}", file=self.stream, flush=True)

    def resumed(self, rows: pl.DataFrame, best) -> None:
        self.line(f"resuming: {len(rows)} attempts on record, best is v{best.version} "
                  f"(score {_fmt(best.score)}), last step {int(rows['step'].max())}")

    def attempt(self, row: dict, best: float | None, elapsed: float) -> None:
        unit = " TFLOPS" if row["ranked"] else ""
        msg = (row["message"] or "").splitlines()[0][:60] if row["message"] else ""
        err = f" | {row['error'].splitlines()[0][:100]}" if row["error"] and row["status"] != "ok" else ""
        paired = ""
        if row.get("paired_ratio") is not None:  # side by side with the incumbent, in the same run
            paired = (f" | x{row['paired_ratio']:.4f} [{row['paired_lo']:.4f}, {row['paired_hi']:.4f}] "
                      f"vs {row['parent_id']} {_fmt(row.get('incumbent_score'))}")
        who = f"w{row['worker']} " if self.workers > 1 and row.get("worker") is not None else ""
        who = f"i{row['island']} {who}" if self.islands > 1 and row.get("island") is not None else who
        self.line(f"{who}step {row['step']:>4}.{row['attempt']} | {row['status']:<13} | {row['decision']:<10} | "
                  f"score {_fmt(row['score'])}{unit}{paired} | best {_fmt(best)} | {_clock(elapsed)} | {msg}{err}")

    def summary(self, s, rows: pl.DataFrame, ranked: bool, bests=()) -> None:
        """bests: each island's best version, when there are several islands."""
        counts = rows.filter(ORIGINAL).group_by("status").len().sort("status")
        taxonomy = ", ".join(f"{r['status']} {r['len']}" for r in counts.iter_rows(named=True))
        self.line(f"done: {s.stopped}")
        best = "no version committed yet" if s.best_version is None else f"best v{s.best_version}"
        self.line(f"{s.attempts} attempts over {s.steps} steps, {s.commits} commits, "
                  f"{best} score {_fmt(s.best_score)}, elapsed {_clock(s.elapsed_s)}")
        self.line(f"outcomes: {taxonomy}")
        if bests:
            self.line("islands' bests: " + ", ".join(f"island {i} v{v.version} {_fmt(v.score)}"
                                                     for i, v in enumerate(bests)))
        if not ranked:
            self.line("this harness ranks nothing (no timing): candidates were compiled and recorded, "
                      "none could be committed; use harness=gpu on a GPU node to search for speed")
        self.line(f"lineage: {s.run_dir}/lineage")
