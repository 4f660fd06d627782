"""The terminal summary of avo.analyze: the handful of numbers people look for first, within the terminal's width.

The wide tables (every outcome, tokens, hours) go to runs.csv, sweep.csv and the report, not to the terminal.
"""
from __future__ import annotations

import textwrap

import polars as pl

from avo.analysis.tables import ACROSS_RUNS, FAILURES
from avo.history import NOT_SIDE_BY_SIDE
from avo.types import OUTCOMES


def _num(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _cut(text: str, n: int) -> str:
    """Shorten from the middle, so both the start and the distinguishing end of a name stay."""
    if len(text) <= n:
        return text
    head = (n - 1) // 2
    return text[:head] + "~" + text[len(text) - (n - 1 - head):]


def _table(header: list[str], rows: list[list[str]], width: int) -> list[str]:
    """Columns separated by two spaces, the first left-aligned and shortened so each line fits `width`."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rest = sum(widths[1:]) + 2 * (len(header) - 1)
    widths[0] = max(8, min(widths[0], width - rest))
    lines = []
    for r in [header, *rows]:
        cells = [_cut(r[0], widths[0]).ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _label(r: dict, keys: list[str]) -> str:
    shown = [f"{k}={r[k]}" for k in keys if r.get(k) is not None]
    return ",".join(shown) if shown else r["name"]


def _ver(v) -> str:
    return "-" if v is None else f"v{v}"


def _failed(r: dict) -> int:
    return sum(r[k] or 0 for k in FAILURES)


def one_run(r: dict, width: int = 80) -> list[str]:
    """A run in four lines: which run, its best and what the lineage proved, what the attempts gave, the cost."""
    what = ", ".join(str(x) for x in (r.get("kernel"), f"group {r['group']}" if r.get("group") else None,
                                      r.get("agent")) if x)
    lines = [f"run {r['name']}" + (f" ({what})" if what else "")]
    if r["x_v0"] is not None:
        lines.append(f"  best   v{r['best_version']}: x{r['x_v0']:.4f} [{r['x_v0_lo']:.4f}, {r['x_v0_hi']:.4f}] "
                     f"over v0 (chained side-by-side ratios); its own evaluation {_num(r['best_score'], '.1f')} "
                     f"TFLOPS, {_num(r['vs_cudnn'], '.2f', 'x')} cuDNN, {_num(r['vs_fa2'], '.2f', 'x')} FA2")
    elif r["best_version"] is not None:
        lines.append(f"  best   v{r['best_version']} (not timed side by side: this harness times nothing)")
    else:
        lines.append("  best   none: the seed did not pass")
    counts = [f"{r[o]} {o.replace('_error', '').replace('_', ' ')}" for o in OUTCOMES if r[o] or o == "committed"]
    lines.append(f"  tried  {r['attempts']} attempts in {r['steps']} steps: " + ", ".join(counts))
    hours, best_hours = _num(r["hours"], ".2f", " h"), _num(r["best_hours"], ".2f", " h")
    lines.append(f"  cost   {hours} of attempts; best after {best_hours} and {r['best_tokens'] or 0:,} tokens; "
                 f"supervisor redirects: {r['interventions']}")
    if (r.get("heads") or 1) > 1:
        lines.append(f"  note   {NOT_SIDE_BY_SIDE.format(n=r['islands'])}")
    return [w for ln in lines for w in textwrap.wrap(ln, width, subsequent_indent=" " * 9)]


def runs(runs_df: pl.DataFrame, keys: list[str], width: int = 80, limit: int = 10) -> list[str]:
    """One line per run, largest gain over its own v0 first: the best, commits out of attempts, hours to the best."""
    ordered = runs_df.sort(["x_v0", "name"], descending=[True, False], nulls_last=True)
    rows = [[_label(r, keys), _ver(r["best_version"]), _num(r["x_v0"], ".4f"), _num(r["best_score"], ".1f"),
             _num(r["vs_cudnn"], ".2f"), _num(r["vs_fa2"], ".2f"), f"{r['commits']}/{r['attempts']}",
             str(_failed(r)), _num(r["best_hours"], ".2f")]
            for r in ordered.head(limit).iter_rows(named=True)]
    out = _table(["run", "best", "x v0", "its TFLOPS", "x cuDNN", "x FA2", "commits", "failed", "h to best"], rows,
                 width)
    if len(ordered) > limit:
        out.append(f"... and {len(ordered) - limit} more runs (every run, every column: runs.csv)")
    return out


def cells(sweep: pl.DataFrame, keys: list[str], width: int = 80) -> list[str]:
    """Sweep cells with replicates: how the best's gain over v0 spreads over the runs of each cell."""
    rows = [[",".join(f"{k}={r[k]}" for k in keys), str(r["runs"]), _num(r["x_v0_mean"], ".4f"),
             _num(r["x_v0_std"], ".4f"), _num(r["x_v0_max"], ".4f"), _num(r["vs_cudnn_mean"], ".2f"),
             f"{r['commits']}/{r['attempts']}"]
            for r in sweep.iter_rows(named=True)]
    return _table(["cell", "runs", "x v0", "+-std", "max", "x cuDNN", "commits"], rows, width)


def text(runs_df: pl.DataFrame, keys: list[str], sweep: pl.DataFrame | None = None, width: int = 80) -> str:
    if len(runs_df) == 1:
        return "\n".join(one_run(runs_df.row(0, named=True), width))
    lines = runs(runs_df, keys, width)
    if sweep is not None and len(sweep) < len(runs_df):
        lines += ["", *cells(sweep, keys, width)]
    if runs_df["best_score"].drop_nulls().is_empty():
        lines.append("(no scores: these runs were not timed, e.g. harness=compile)")
    else:
        lines += textwrap.wrap(f"note: {ACROSS_RUNS}", width)
    return "\n".join(lines)
