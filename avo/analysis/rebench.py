"""Versions timed together: avo.bench runs of a run's committed versions, read into the report.

A version's score in the lineage comes from its own evaluation; two of them are not comparable. A bench run
times several versions side by side in one worker (interleaved, the same inputs and clocks), so its TFLOPS
are:

    python -m avo.bench kernel=mha 'seeds=[<run>:0,<run>:3,<run>:7]' out=<run>/rebench
    python -m avo.analyze <run> --bench <run>/rebench

A bench.json names where each seed came from (meta.origins: run directory and version); one written
before it did is matched by its seed names, `<run folder>:v<k>` or `<run folder>:<k>`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl

from avo.analysis.reader import AnalysisError

NAME = re.compile(r"(?:.*/)?([^/:]+):v?(\d+)$")
COLUMNS = {"bench": pl.String, "run_id": pl.String, "version": pl.Int64, "key": pl.String, "tflops": pl.Float64,
           "cudnn_tflops": pl.Float64, "fa2_tflops": pl.Float64, "score": pl.Float64}


def _origin(name: str, meta: dict, runs: pl.DataFrame) -> tuple[str, int] | None:
    o = (meta.get("origins") or {}).get(name)
    if o and o.get("run_dir") is not None:
        hit = runs.filter(pl.col("run_dir").map_elements(lambda d: str(Path(d).resolve()), pl.String)
                          == str(Path(o["run_dir"]).resolve()))
        return (hit["run_id"][0], int(o["version"])) if len(hit) else None
    m = NAME.fullmatch(name)
    hit = runs.filter(pl.col("name") == m.group(1)) if m and not meta.get("origins") else runs.head(0)
    return (hit["run_id"][0], int(m.group(2))) if len(hit) == 1 else None


def load(paths: list[Path], runs: pl.DataFrame) -> pl.DataFrame:
    """One row per (bench run, version, config) of the loaded runs' versions found in the bench.json files."""
    rows = []
    for p in map(Path, paths):
        f = p / "bench.json" if p.is_dir() else p
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise AnalysisError(f"--bench {p}: no readable bench.json ({e})") from None
        for name, r in data.get("results", {}).items():
            where = _origin(name, data.get("meta", {}), runs)
            if where is None or r.get("status") != "ok":
                continue
            rows += [{"bench": str(f), "run_id": where[0], "version": where[1], "key": c["key"], "tflops": c["tflops"],
                      "cudnn_tflops": c.get("cudnn_tflops"), "fa2_tflops": c.get("fa2_tflops"), "score": r.get("score")}
                     for c in r.get("configs", [])]
    return pl.DataFrame(rows, schema=COLUMNS)


def table(df: pl.DataFrame) -> pl.DataFrame:
    """Per bench run and version: the geomean and each config's TFLOPS, and the ratio to v0 in that same run."""
    wide = df.pivot(on="key", index=["bench", "version", "score"], values="tflops").sort("bench", "version")
    v0 = wide.filter(pl.col("version") == 0).select("bench", v0="score")
    return (wide.join(v0, on="bench", how="left")
            .with_columns(x_v0=(pl.col("score") / pl.col("v0")).round(4), score=pl.col("score").round(1))
            .drop("v0").with_columns(pl.col(pl.Float64).exclude("x_v0").round(1)))


def plot(df: pl.DataFrame, path: Path) -> Path | None:
    """Per config and in geomean, the versions of one bench run side by side, with cuDNN and FA2 from it."""
    from avo.analysis.plots import CUDNN, FA2, _save, plt

    if df["version"].n_unique() < 2:
        return None
    keys = df["key"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    versions = sorted(df["version"].unique().to_list())
    w = 0.8 / len(versions)
    for i, v in enumerate(versions):
        d = dict(df.filter(pl.col("version") == v).select("key", "tflops").iter_rows())
        axes[0].bar([j + (i - len(versions) / 2 + 0.5) * w for j in range(len(keys))], [d.get(k) or 0 for k in keys],
                    w, label=f"v{v}")
    for style, col, name in ((CUDNN, "cudnn_tflops", "cuDNN"), (FA2, "fa2_tflops", "FA2")):
        per = df.group_by("key").agg(pl.col(col).drop_nulls().median())[col].drop_nulls()
        if len(per) and (per > 0).all():
            axes[1].axhline(math.exp(per.log().mean()), label=name, **style)
    axes[0].set_xticks(range(len(keys)), [k.replace("_", "\n", 2) for k in keys], fontsize=7)
    axes[0].set_ylabel("TFLOPS (timed together)")
    axes[0].legend(fontsize=7, ncol=min(6, len(versions)))
    scores = df.group_by("version").agg(pl.col("score").first()).sort("version")["score"].to_list()
    axes[1].plot(range(len(versions)), scores, "o-", color="#2ca02c")
    axes[1].set_xticks(range(len(versions)), [f"v{v}" for v in versions])
    axes[1].set_title("geometric mean", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"versions timed side by side: {df['bench'][0]}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
