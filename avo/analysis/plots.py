"""PNG figures (matplotlib, Agg): what each run's lineage proved, outcomes, sweeps.

Versions are drawn by what the lineage proved about them (avo.history): their speed over v0, the chain of
paired ratios each commit was timed with, and its interval. No figure puts two versions' stored scores on
one axis: those come from different evaluations. cuDNN and FA2 appear as v0's own evaluation measured them,
in the same units. Absolute TFLOPS of several versions come only from a run that timed them together
(avo.analysis.rebench).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from avo.analysis import tables  # noqa: E402
from avo.analysis.reader import Lineage  # noqa: E402
from avo.history import link  # noqa: E402

COLORS = {"adapted": "#1b5e20", "committed": "#2ca02c", "not_faster": "#9e9e9e", "regression": "#bdbdbd",
          "screened": "#cfd8dc", "unpaired": "#80cbc4", "stale": "#ffe082", "unranked": "#e0e0e0",
          "invalid": "#8c564b", "compile_error": "#ff7f0e", "incorrect": "#d62728", "crashed": "#8c1d40",
          "timeout": "#9467bd", "error": "#e377c2", "unavailable": "#17becf", "interrupted": "#bcbd22"}
CUDNN, FA2 = dict(color="#1f77b4", ls="--", lw=1.2), dict(color="#ff7f0e", ls=":", lw=1.4)
ISLANDS = plt.get_cmap("tab10")
plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                     "axes.spines.right": False, "font.size": 9})


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _title(lin: Lineage, run_id: str) -> str:
    r = lin.runs.filter(pl.col("run_id") == run_id).row(0, named=True)
    bits = [r.get("kernel"), f"group {r['group']}" if r.get("group") else None, r.get("agent")]
    return f"{r['name']}  ({', '.join(b for b in bits if b)})"


def config_chains(c: pl.DataFrame) -> dict[str, dict[int, tuple]]:
    """Per benchmark config, each version's chain over v0 of the per-config paired ratios (avo.history.link)."""
    found: dict[str, dict[str, tuple | None]] = {}
    out: dict[str, dict[int, tuple]] = {}
    for r in c.sort("version").iter_rows(named=True):
        for cfg in r["configs"] or []:
            k = cfg["key"]
            mine = found.setdefault(k, {})
            mine[r["candidate_id"]] = link(mine.get(r["parent_id"]), {
                "decision": r["decision"], "paired_ratio": cfg.get("ratio"), "paired_lo": cfg.get("ratio_lo"),
                "paired_hi": cfg.get("ratio_hi")})
            if mine[r["candidate_id"]] is not None:
                out.setdefault(k, {})[r["version"]] = mine[r["candidate_id"]]
    return out


def _lines(ax, points: dict[int, tuple], island_of: dict[int, int], islands: int) -> None:
    """One island's chain per line: speed over v0 with its interval, v0 the common start."""
    last = max(points)
    for i in range(islands):
        vs = sorted(v for v in points if v == 0 or island_of[v] == i)
        if len(vs) < 2 and i:
            continue
        y, lo, hi = ([points[v][k] for v in vs] for k in range(3))
        color = ISLANDS(i % 10)
        ax.step(vs + [last], y + y[-1:], where="post", color=color, lw=1.8,  # the head's level to the last version
                label=f"island {i}" if islands > 1 else None)
        below, above = [a - b for a, b in zip(y, lo, strict=True)], [b - a for a, b in zip(y, hi, strict=True)]
        ax.errorbar(vs, y, yerr=[below, above], fmt="o", color=color, ms=3.5, capsize=2, lw=0.8)


def trajectory(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Speed over v0 against version: the chain of paired ratios with their intervals, geomean and per config."""
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    if c["x_v0"].drop_nulls().len() < 2:  # one version is a point, not a trajectory
        return None
    island_of = dict(zip(c["version"], c["island"].fill_null(0), strict=True))
    islands = int(c["islands"][0] or 1)
    per = config_chains(c)
    v0 = c.filter(pl.col("version") == 0)
    v0cfg = {x["key"]: x for x in (v0["configs"][0] if len(v0) and v0["configs"][0] is not None else [])}
    n = len(per) + 1
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.0 * math.ceil(n / cols)), squeeze=False)
    geo = {r["version"]: (r["x_v0"], r["x_v0_lo"], r["x_v0_hi"]) for r in c.iter_rows(named=True) if r["x_v0"]}
    base = list(v0cfg.values())
    panels = [("geometric mean", geo, _gm(base, "cudnn_tflops"), _gm(base, "fa2_tflops"), _gm(base, "tflops"))]
    panels += [(k, pts, v0cfg.get(k, {}).get("cudnn_tflops"), v0cfg.get(k, {}).get("fa2_tflops"),
                v0cfg.get(k, {}).get("tflops")) for k, pts in per.items()]
    for ax, (name, pts, cudnn, fa2, base) in zip(axes.flat, panels, strict=False):
        _lines(ax, pts, island_of, islands)
        if cudnn and base:
            ax.axhline(cudnn / base, label=f"cuDNN {cudnn / base:.3f}", **CUDNN)
        if fa2 and base and fa2 / base > 0.8:  # far below: it would squash the chain into a line
            ax.axhline(fa2 / base, label=f"FA2 {fa2 / base:.3f}", **FA2)
        ax.set_title(name, fontsize=8.5)
        ax.set_xlabel("version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("speed over v0")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"what the lineage proved (chained side-by-side ratios; cuDNN and FA2 as v0's evaluation "
                 f"timed them): {_title(lin, run_id)}", fontsize=10, y=1.01)
    fig.tight_layout()
    return _save(fig, path)


def _gm(cfgs: list[dict], col: str) -> float | None:
    xs = [x[col] for x in cfgs if x.get(col)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs and len(xs) == len(cfgs) else None


def best_over_time(c: pl.DataFrame) -> tuple[list[float], list[float]]:
    """(hours, the best's x_v0) at each commit of one run, in time order: the head with the highest chain."""
    heads: dict[int, float] = {}
    xs, ys = [], []
    for r in c.sort("hours").iter_rows(named=True):
        if r["x_v0"] is None:
            continue
        if r["version"] == 0:
            heads = dict.fromkeys(range(int(r["islands"] or 1)), r["x_v0"])
        else:
            heads[r["island"] or 0] = r["x_v0"]
        xs.append(r["hours"])
        ys.append(max(heads.values()))
    return xs, ys


def progress(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Every ranked attempt's speed over v0 (its paired ratio times its parent's chain) and the best's, against
    active hours, coloured by outcome."""
    a = tables.attempts(lin).filter(pl.col("run_id") == run_id).collect()
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    chain = c.select(parent_id="candidate_id", parent_x="x_v0")
    a = a.join(chain, on="parent_id", how="left").with_columns(x=pl.col("parent_x") * pl.col("paired_ratio"))
    if a["x"].drop_nulls().is_empty():  # nothing was timed side by side: nothing to show over time
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for (o,), d in a.filter(pl.col("x").is_not_null() & ~pl.col("committed")).group_by("outcome", maintain_order=True):
        ax.plot(d["hours"], d["x"], "o", ms=3, alpha=0.6, color=COLORS.get(o, "#777"), label=o.replace("_", " "))
    xs, ys = best_over_time(c)
    ax.step(xs + [a["hours"].max()], ys + ys[-1:], where="post", color="#2ca02c", lw=2, label="best (x v0)")
    ax.set_xlabel("active hours")
    ax.set_ylabel("speed over v0 (side by side)")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.set_title(f"attempts over time: {_title(lin, run_id)}", fontsize=10)
    return _save(fig, path)


def config_bars(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Per benchmark config: the best version, cuDNN and FA2, as the best version's own evaluation timed them."""
    best = tables.best_configs(lin).filter(pl.col("run_id") == run_id).collect()
    if best.is_empty():
        return None
    bv = best["version"][0]
    keys = best["key"].to_list()
    series = [(f"v{bv} (the best)", "tflops", "#2ca02c"), ("cuDNN", "cudnn_tflops", "#1f77b4"),
              ("FA2", "fa2_tflops", "#ff7f0e")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 3.8))
    w = 0.8 / len(series)
    for i, (name, col, color) in enumerate(series):
        bars = ax.bar([j + (i - 1) * w for j in range(len(keys))], best[col].fill_null(0.0).to_list(), w, label=name,
                      color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n", 2) for k in keys], fontsize=7)
    ax.set_ylabel("TFLOPS (one evaluation)")
    ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, 1.12))
    ax.set_title(f"v{bv}'s evaluation: {_title(lin, run_id)}", fontsize=10, pad=24)
    return _save(fig, path)


def outcomes(lin: Lineage, run_id: str, path: Path, bins: int = 40) -> Path | None:
    """Attempt outcomes per block of steps (stacked), so failure modes over time are visible."""
    a = tables.attempts(lin).filter((pl.col("run_id") == run_id) & (pl.col("step") > 0)).collect()
    if a.is_empty():
        return None
    steps = int(a["step"].max() or 1)
    width = max(1, math.ceil(steps / bins))
    a = a.with_columns(bin=((pl.col("step") - 1) // width) * width + 1)
    counts = a.pivot(on="outcome", index="bin", values="n", aggregate_function="len").sort("bin").fill_null(0)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    bottom = [0] * len(counts)
    for o in [o for o in COLORS if o in counts.columns]:
        ys = counts[o].to_list()
        ax.bar([b + (width - 1) / 2 for b in counts["bin"]], ys, width * 0.9, bottom=bottom, color=COLORS[o],
               label=o.replace("_", " "))
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("step" if width == 1 else f"step (blocks of {width})")
    ax.set_ylabel("attempts")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"attempt outcomes: {_title(lin, run_id)}", fontsize=10)
    return _save(fig, path)


def sweep(lin: Lineage, path: Path, by: list[str] | None = None, runs: pl.DataFrame | None = None) -> Path | None:
    """The best's speed over its run's own v0 against active hours per run, coloured by sweep cell, and per cell."""
    runs = tables.runs_summary(lin) if runs is None else runs
    by = by or lin.sweep_keys or ["kernel", "group"]
    label = pl.concat_str([pl.lit(f"{k}=") + pl.col(k).cast(pl.String).fill_null("-") for k in by], separator=" ")
    runs = runs.with_columns(cell=label)
    cells = runs["cell"].unique(maintain_order=True).sort().to_list()
    cmap = plt.get_cmap("tab10" if len(cells) <= 10 else "tab20")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(cells)}
    c = tables.commits(lin).collect().join(runs.select("run_id", "cell"), on="run_id")
    if c["x_v0"].drop_nulls().is_empty():
        return None
    end = dict(tables.attempts(lin).group_by("run_id").agg(pl.col("hours").max()).collect().iter_rows())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    seen = set()
    for (rid,), d in c.group_by("run_id", maintain_order=True):
        xs, ys = best_over_time(d)
        if not xs:
            continue
        cell = d["cell"][0]
        ax.step(xs + [end[rid]], ys + ys[-1:], where="post", color=color[cell], lw=1.2, alpha=0.8,
                label=None if cell in seen else cell)
        seen.add(cell)
    ax.set_xlabel("active hours")
    ax.set_ylabel("best's speed over its run's v0")
    if len(cells) <= 12:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{len(runs)} runs in {len(cells)} cells", fontsize=10)
    for i, cell in enumerate(cells):
        ys = runs.filter(pl.col("cell") == cell)["x_v0"].drop_nulls().to_list()
        bx.bar(i, sum(ys) / len(ys) if ys else 0, 0.6, color=color[cell], alpha=0.5)
        bx.plot([i] * len(ys), ys, "o", color=color[cell], ms=4)
    if len(cells) <= 12:
        bx.set_xticks(range(len(cells)), [x.replace(" ", "\n") for x in cells], fontsize=7)
    else:
        bx.set_xticks(range(len(cells)), cells, fontsize=5, rotation=90)
    bx.set_ylabel("x v0 per run (bar: mean)")
    bx.set_title("by " + ", ".join(by), fontsize=10)
    return _save(fig, path)
