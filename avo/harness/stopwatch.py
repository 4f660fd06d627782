"""Wall clocks around the pieces of an evaluation, for benchmarks/eval_cost.py. Off unless started.

The harness names its pieces (`with piece("launch:candidate"):`); while a Stopwatch runs, each piece
is timed between device-wide synchronizes (so the GPU work it enqueued is its own) and filed under
the pieces it runs inside ("evaluation/bench/@full_b8_s4096_h16-16_d128/checks"; a component starting
with "@" is a shape, which `merged` folds). Off, a piece is one shared no-op context: nothing is
synchronized and the timings of the search are those of the code without it. Main thread only.
No torch at import: `rows` is the table's pure logic.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

_NOOP = contextlib.nullcontext()
SHAPE = "@"  # the prefix of a piece that is a benchmark shape


@dataclass
class Stopwatch:
    sync: object = None                      # called at each piece's edges (torch.cuda.synchronize)
    totals: dict[str, list] = field(default_factory=dict)  # path -> [calls, seconds]
    stack: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def piece(self, name: str):
        if self.sync:
            self.sync()
        self.stack.append(name)
        path = "/".join(self.stack)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            entry = self.totals.setdefault(path, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            self.stack.pop()


_running: Stopwatch | None = None


def start(sync=None) -> Stopwatch:
    global _running
    _running = Stopwatch(sync)
    return _running


def stop() -> Stopwatch | None:
    global _running
    watch, _running = _running, None
    return watch


def piece(name: str):
    """Time the block as `name` while a Stopwatch runs; otherwise a no-op."""
    return _NOOP if _running is None else _running.piece(name)


def summed(many: list[dict[str, list]], key=lambda path: path) -> dict[str, list]:
    """Several stopwatches' totals added up piece by piece, each path filed under key(path)."""
    out: dict[str, list] = {}
    for totals in many:
        for path, (calls, s) in totals.items():
            entry = out.setdefault(key(path), [0, 0.0])
            entry[0] += calls
            entry[1] += s
    return out


def merged(totals: dict[str, list], shapes: bool = False) -> dict[str, list]:
    """The totals with the shapes of each stage summed into one piece, "@*" (shapes=True: kept apart)."""
    if shapes:
        return summed([totals])
    return summed([totals], lambda path: "/".join(SHAPE + "*" if p.startswith(SHAPE) else p for p in path.split("/")))


@dataclass
class Row:
    piece: str      # the path, indented by depth in the table
    calls: int
    total_s: float
    per_eval_s: float
    share: float    # of the `whole` piece's total
    depth: int = 0  # pieces it runs inside, in the table


def rows(totals: dict[str, list], evaluations: int, whole: str = "evaluation", base: float | None = None) -> list[Row]:
    """Table rows in tree order (children after their parent, slowest first), with a "(rest)" row under every
    parent for its time outside its children (host work between pieces, or what no piece names). The share
    is of `base` seconds, by default the `whole` piece's total."""
    base = base or totals.get(whole, [0, 0.0])[1] or 1.0
    children: dict[str, list[str]] = {}
    for path in totals:  # under the nearest enclosing piece that was timed
        parts = path.split("/")
        parent = next(("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if "/".join(parts[:i]) in totals), "")
        children.setdefault(parent, []).append(path)
    out: list[Row] = []

    def walk(parent: str, depth: int) -> None:
        for path in sorted(children.get(parent, []), key=lambda p: -totals[p][1]):
            calls, s = totals[path]
            out.append(Row(path, calls, s, s / max(evaluations, 1), s / base, depth))
            kids = children.get(path)
            if kids:
                walk(path, depth + 1)
                rest = s - sum(totals[k][1] for k in kids)
                out.append(Row(f"{path}/(rest)", calls, rest, rest / max(evaluations, 1), rest / base, depth + 1))

    walk("", 0)
    return out


def render(table: list[Row]) -> str:
    """The rows as a fixed-width table, each piece indented by its depth."""
    names = ["  " * r.depth + r.piece.rsplit("/", 1)[-1].replace(SHAPE + "*", "each shape") for r in table]
    w = max([len("piece"), *map(len, names)])
    lines = [f"{'piece':<{w}}  {'calls':>6}  {'total s':>9}  {'s per eval':>10}  {'share':>7}"]
    for name, r in zip(names, table, strict=True):
        lines.append(f"{name:<{w}}  {r.calls:>6}  {r.total_s:>9.4f}  {r.per_eval_s:>10.4f}  {100 * r.share:>6.1f}%")
    return "\n".join(lines)
