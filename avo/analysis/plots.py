"""PNG figures (matplotlib, Agg): trajectories of committed versions, per-config bars, outcomes, sweeps."""
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

COLORS = {"committed": "#2ca02c", "seed": "#1b5e20", "not_faster": "#9e9e9e", "regression": "#bdbdbd",
          "unranked": "#e0e0e0", "compile_error": "#ff7f0e", "incorrect": "#d62728", "crashed": "#8c1d40",
          "timeout": "#9467bd", "invalid": "#8c564b", "error": "#e377c2", "failed": "#7f7f7f"}
CUDNN, FA2 = dict(color="#1f77b4", ls="--", lw=1.2), dict(color="#ff7f0e", ls=":", lw=1.4)
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


def trajectory(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Per-config TFLOPS and the geometric mean against version number, cuDNN/FA2 as reference lines."""
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    if c["score"].drop_nulls().len() < 2:  # one version is a point, not a trajectory: the config bars show it
        return None
    cfg = tables.configs(c.lazy()).collect()
    keys = cfg["key"].unique(maintain_order=True).to_list()
    n = len(keys) + 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    panels = [("geometric mean", c["version"], c["score"],
               _gm(cfg, "cudnn_tflops"), _gm(cfg, "fa2_tflops"))]
    for k in keys:
        d = cfg.filter(pl.col("key") == k)
        panels.append((k, d["version"], d["tflops"], d["cudnn_tflops"].drop_nulls().median(),
                       d["fa2_tflops"].drop_nulls().median()))
    for ax, (name, x, y, cudnn, fa2) in zip(axes.flat, panels, strict=False):
        ax.step(x, y, where="post", color="#2ca02c", lw=1.8)
        if len(x) <= 60:
            ax.plot(x, y, "o", color="#2ca02c", ms=3.5)
        if cudnn:
            ax.axhline(cudnn, label=f"cuDNN {cudnn:.0f}", **CUDNN)
        if fa2:
            ax.axhline(fa2, label=f"FA2 {fa2:.0f}", **FA2)
        ax.set_title(name, fontsize=8.5)
        ax.set_xlabel("version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("TFLOPS")
        if cudnn or fa2:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"committed versions: {_title(lin, run_id)}", fontsize=10, y=1.01)
    fig.tight_layout()
    return _save(fig, path)


def _gm(cfg: pl.DataFrame, col: str) -> float | None:
    """Geometric mean over configs of the baseline (baselines are per config, identical across versions)."""
    per = cfg.group_by("key").agg(pl.col(col).drop_nulls().median())[col].drop_nulls()
    return math.exp(per.log().mean()) if len(per) and (per > 0).all() else None


def progress(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Best score and every ranked attempt against active hours, coloured by outcome."""
    a = tables.attempts(lin).filter(pl.col("run_id") == run_id).collect()
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    if a["score"].drop_nulls().len() < 2:  # a single timed attempt (the seed) has nothing to show over time
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    scored = a.filter(pl.col("score").is_not_null() & ~pl.col("committed"))
    for outcome, d in scored.group_by("outcome", maintain_order=True):
        ax.plot(d["hours"], d["score"], "o", ms=3, alpha=0.6, color=COLORS.get(outcome[0], "#777"),
                label=outcome[0].replace("_", " "))
    if len(c):
        x = c["hours"].to_list() + [a["hours"].max()]
        y = c["score"].to_list() + [c["score"][-1]]
        ax.step(x, y, where="post", color="#2ca02c", lw=2, label="best committed")
        ax.plot(c["hours"], c["score"], "o", color="#1b5e20", ms=5)
    cfg = tables.configs(c.lazy()).collect()
    for col, style, name in (("cudnn_tflops", CUDNN, "cuDNN"), ("fa2_tflops", FA2, "FA2")):
        g = _gm(cfg, col)
        if g:
            ax.axhline(g, label=f"{name} {g:.0f}", **style)
    ax.set_xlabel("active hours")
    ax.set_ylabel("geometric-mean TFLOPS")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.set_title(f"score over time: {_title(lin, run_id)}", fontsize=10)
    return _save(fig, path)


def config_bars(lin: Lineage, run_id: str, path: Path) -> Path | None:
    """Per benchmark config: the seed, the best version, cuDNN and FA2."""
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    cfg = tables.configs(c.lazy()).collect()
    best = tables.best(lin).filter(pl.col("run_id") == run_id).collect()
    if best.is_empty() or cfg.is_empty():
        return None
    bv = best["version"][0]
    keys = cfg["key"].unique(maintain_order=True).to_list()
    series = [("seed (v0)", cfg.filter(pl.col("version") == 0), "tflops", "#c7e9c0"),
              (f"best (v{bv})", cfg.filter(pl.col("version") == bv), "tflops", "#2ca02c"),
              ("cuDNN", cfg.filter(pl.col("version") == bv), "cudnn_tflops", "#1f77b4"),
              ("FA2", cfg.filter(pl.col("version") == bv), "fa2_tflops", "#ff7f0e")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 3.8))
    w = 0.8 / len(series)
    for i, (name, d, col, color) in enumerate(series):
        vals = dict(zip(d["key"], d[col], strict=True))
        ys = [vals.get(k) or 0.0 for k in keys]
        bars = ax.bar([j + (i - 1.5) * w for j in range(len(keys))], ys, w, label=name, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(range(len(keys)), [k.replace("_", "\n", 2) for k in keys], fontsize=7)
    ax.set_ylabel("TFLOPS")
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, 1.12))
    ax.set_title(_title(lin, run_id), fontsize=10, pad=24)
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
    for o in [o for o in tables.OUTCOMES if o in counts.columns]:
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
    """Best score over active hours per run, coloured by sweep cell, and best score per cell."""
    runs = tables.runs_summary(lin) if runs is None else runs
    by = by or lin.sweep_keys or ["kernel", "group"]
    label = pl.concat_str([pl.lit(f"{k}=") + pl.col(k).cast(pl.String).fill_null("-") for k in by],
                          separator=" ")
    runs = runs.with_columns(cell=label)
    cells = runs["cell"].unique(maintain_order=True).sort().to_list()
    cmap = plt.get_cmap("tab10" if len(cells) <= 10 else "tab20")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(cells)}
    c = tables.commits(lin).select("run_id", "hours", "score").collect().join(
        runs.select("run_id", "cell"), on="run_id").drop_nulls("score")
    if c.is_empty():
        return None
    end = tables.attempts(lin).group_by("run_id").agg(pl.col("hours").max().alias("end")).collect()
    end = dict(zip(end["run_id"], end["end"], strict=True))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    seen = set()
    for (rid,), d in c.sort("hours").group_by("run_id", maintain_order=True):
        cell = d["cell"][0]
        ax.step(d["hours"].to_list() + [end[rid]], d["score"].to_list() + [d["score"][-1]], where="post",
                color=color[cell], lw=1.2, alpha=0.8, label=None if cell in seen else cell)
        seen.add(cell)
    ax.set_xlabel("active hours")
    ax.set_ylabel("best geometric-mean TFLOPS")
    if len(cells) <= 12:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{len(runs)} runs in {len(cells)} cells", fontsize=10)
    for i, cell in enumerate(cells):
        ys = runs.filter(pl.col("cell") == cell)["best_score"].drop_nulls().to_list()
        bx.bar(i, sum(ys) / len(ys) if ys else 0, 0.6, color=color[cell], alpha=0.5)
        bx.plot([i] * len(ys), ys, "o", color=color[cell], ms=4)
    if len(cells) <= 12:
        bx.set_xticks(range(len(cells)), [x.replace(" ", "\n") for x in cells], fontsize=7)
    else:
        bx.set_xticks(range(len(cells)), cells, fontsize=5, rotation=90)
    bx.set_ylabel("best TFLOPS per run (bar: mean)")
    bx.set_title("by " + ", ".join(by), fontsize=10)
    return _save(fig, path)
