"""What a person watching a run sees: one line per attempt and a closing summary."""
from __future__ import annotations

import sys

import polars as pl

from avo.schema import ORIGINAL, OUTCOME
from avo.types import OUTCOMES


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


def _x(v) -> str:
    """A version and what the lineage proved about it: `v3 x1.0123` (its chained paired ratio over v0)."""
    if v is None:
        return "-"
    return f"v{v.version}" + (f" x{v.chain_ratio:.4f}" if v.chain_ratio is not None else "")


class Progress:
    def __init__(self, run_id: str, ranked: bool, stream=None, workers: int = 1, islands: int = 1):
        self.run_id, self.ranked = run_id, ranked
        self.stream = stream or sys.stdout
        self.workers, self.islands = workers, islands  # more than one: each line names the worker / island

    def line(self, text: str) -> None:
        print(f"[avo {self.run_id}] {text}", file=self.stream, flush=True)

    def resumed(self, rows: pl.DataFrame, best) -> None:
        self.line(f"resuming: {len(rows)} rows on record, best {_x(best)} over v0, last step {int(rows['step'].max())}")

    def attempt(self, row: dict, head, elapsed: float) -> None:
        """One row, and its island's head after it (the best: chained paired ratios over v0, never a score)."""
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
                  f"score {_fmt(row['score'])}{unit}{paired} | best {_x(head)} | {_clock(elapsed)} | {msg}{err}")

    def summary(self, s, rows: pl.DataFrame, ranked: bool, heads=(), note: str = "") -> None:
        """heads: each island's head, when there are several islands; note: why their order is an estimate."""
        counts = dict(rows.filter((pl.col("step") > 0) & ORIGINAL).group_by(OUTCOME.alias("o")).len().iter_rows())
        taxonomy = ", ".join(f"{o} {counts[o]}" for o in OUTCOMES if o in counts)
        self.line(f"done: {s.stopped}")
        best = "no version committed yet" if s.best_version is None else f"best v{s.best_version}"
        if s.best_ratio is not None and s.best_score is not None:  # timed side by side
            best += (f" x{s.best_ratio:.4f} over v0 (chained paired ratios), its own evaluation "
                     f"{_fmt(s.best_score)} TFLOPS")
        self.line(f"{s.attempts} attempts over {s.steps} steps, {s.commits} commits, {best}, "
                  f"elapsed {_clock(s.elapsed_s)}")
        self.line(f"outcomes: {taxonomy or 'none'}")
        if heads:
            self.line("islands' heads: " + ", ".join(f"island {i} {_x(v)}" for i, v in enumerate(heads)))
        if note:
            self.line(note)
        if not ranked:
            self.line("this harness ranks nothing (no timing): candidates were compiled and recorded, "
                      "none could be committed; use harness=gpu on a GPU node to search for speed")
        self.line(f"lineage: {s.run_dir}/lineage")
