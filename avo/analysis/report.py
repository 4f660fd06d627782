"""Reports: Markdown (with PNG files beside it), self-contained HTML (images embedded) or CSV tables."""
from __future__ import annotations

import base64
import difflib
import html
import re
from pathlib import Path

import polars as pl

from avo import lineage
from avo.analysis import cost, plots, rebench, tables
from avo.analysis import workers as crew
from avo.analysis.reader import Lineage
from avo.fsutil import atomic_write_text
from avo.history import NOT_SIDE_BY_SIDE
from avo.types import OUTCOMES

MAX_DIFF_LINES = 600


def run_table(runs: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The per-run summary as a reader wants it: rounded, one column per outcome, short names."""
    r = runs
    return r.select(
        pl.col("name").alias("run"), *[pl.col(k) for k in keys if k in r.columns],
        "steps", "attempts", *OUTCOMES, (pl.col("acceptance") * 100).round(1).alias("accept_%"),
        pl.col("best_version").alias("best_v"), pl.col("x_v0").round(4), pl.col("x_v0_lo").round(4).alias("lo"),
        pl.col("x_v0_hi").round(4).alias("hi"), pl.col("best_score").round(1).alias("its_tflops"),
        pl.col("vs_cudnn").round(3), pl.col("vs_fa2").round(3),
        pl.col("hours").round(2), pl.col("best_hours").round(2).alias("h_to_best"),
        pl.col("best_tokens").alias("tokens_to_best"), pl.col("interventions").alias("redirects"))


def sweep_table(sweep: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return sweep.select(
        *by, "runs", "attempts", *OUTCOMES, (pl.col("acceptance") * 100).round(1).alias("accept_%"),
        pl.col("x_v0_mean").round(4), pl.col("x_v0_std").round(4), pl.col("x_v0_max").round(4),
        pl.col("best_mean").round(1), pl.col("best_max").round(1),
        pl.col("vs_cudnn_mean").round(3).alias("vs_cudnn"), pl.col("vs_fa2_mean").round(3).alias("vs_fa2"),
        pl.col("best_hours_median").round(2).alias("h_to_best"))


def commit_table(c: pl.DataFrame) -> pl.DataFrame:
    # x_parent [lo, hi]: timed side by side with its parent; x_v0: those chained (avo.history); score: its own
    # evaluation, not comparable with another version's
    return c.select("version", "island", "step", "attempt", "decision",
                    pl.col("x_parent").round(4), pl.col("x_parent_lo").round(4).alias("lo"),
                    pl.col("x_parent_hi").round(4).alias("hi"), pl.col("x_v0").round(4),
                    pl.col("x_v0_lo").round(4).alias("v0_lo"), pl.col("x_v0_hi").round(4).alias("v0_hi"),
                    pl.col("score").round(1).alias("own_tflops"), pl.col("n").alias("attempts"),
                    pl.col("hours").round(3), pl.col("cum_tokens").alias("tokens"),
                    pl.col("message").str.replace_all(r"\s+", " ").str.slice(0, 160))


def config_table(b: pl.DataFrame) -> pl.DataFrame:
    return b.select("key", pl.col("tflops").round(1), pl.col("cudnn_tflops").round(1).alias("cudnn"),
                    pl.col("fa2_tflops").round(1).alias("fa2"), pl.col("vs_cudnn").round(3),
                    pl.col("vs_fa2").round(3), pl.col("ms").round(4), pl.col("max_err"))


def markdown(df: pl.DataFrame) -> str:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def html_table(df: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{'' if v is None else html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def best_diff(lin: Lineage, run_id: str) -> str:
    """Unified diff of the best committed version against the seed (x_0)."""
    c = tables.commits(lin).filter(pl.col("run_id") == run_id).collect()
    b = tables.best(lin).filter(pl.col("run_id") == run_id).collect()
    if c.is_empty() or b.is_empty():
        return "(no committed version)"
    seed, best = c.row(0, named=True), b.row(0, named=True)
    if best["version"] == seed["version"]:
        return "(the seed is still the best version)"
    if not seed["source_sha"] or not best["source_sha"]:
        return "(diff unavailable: the lineage records no source_sha)"
    try:
        a = lineage.read_source(seed["run_dir"], seed["source_sha"]).splitlines(keepends=True)
        z = lineage.read_source(best["run_dir"], best["source_sha"]).splitlines(keepends=True)
    except FileNotFoundError as e:
        return f"(diff unavailable: {e})"
    diff = list(difflib.unified_diff(a, z, f"v{seed['version']} (seed)", f"v{best['version']} (best)"))
    if len(diff) > MAX_DIFF_LINES:
        diff = diff[:MAX_DIFF_LINES] + [f"\n... {len(diff) - MAX_DIFF_LINES} more lines\n"]
    return "".join(diff) or "(identical sources)"


def _proved(r: dict) -> str:
    if r["x_v0"] is None:
        return f" (its own evaluation: {r['best_score']:.1f} TFLOPS)" if r["best_score"] is not None else ""
    return (f": x{r['x_v0']:.4f} [{r['x_v0_lo']:.4f}, {r['x_v0_hi']:.4f}] over v0 by its chain of side-by-side "
            f"ratios; {r['best_score']:.1f} TFLOPS in its own evaluation")


class _Doc:
    """Accumulates sections; images become files (Markdown) or data URIs (HTML)."""

    def __init__(self, fmt: str, out: Path):
        self.fmt, self.out, self.parts = fmt, out, []

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"{'#' * level} {text}" if self.fmt == "md" else f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.parts.append(text if self.fmt == "md" else f"<p>{html.escape(text)}</p>")

    def table(self, df: pl.DataFrame) -> None:
        self.parts.append(markdown(df) if self.fmt == "md" else html_table(df))

    def code(self, text: str, lang: str = "") -> None:
        self.parts.append(f"```{lang}\n{text}\n```" if self.fmt == "md" else f"<pre>{html.escape(text)}</pre>")

    def image(self, path: Path | None) -> None:
        if path is None:
            return
        if self.fmt == "md":
            self.parts.append(f"![{path.stem}]({path.relative_to(self.out).as_posix()})")
        else:
            data = base64.b64encode(path.read_bytes()).decode()
            self.parts.append(f'<img alt="{path.stem}" src="data:image/png;base64,{data}">')

    def text(self) -> str:
        body = "\n\n".join(self.parts) + "\n"
        if self.fmt == "md":
            return body
        style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}table{border-collapse:collapse;"
                 "font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
                 "pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:11px}img{max-width:100%}")
        return f"<!doctype html><html><head><meta charset='utf-8'><title>AVO lineage report</title>" \
               f"<style>{style}</style></head><body>\n{body}</body></html>\n"


def detail_runs(runs: pl.DataFrame, limit: int) -> list[str]:
    """The runs given a section of their own: all when few, else those whose best gained most over their v0."""
    ordered = runs.sort(["x_v0", "name"], descending=[True, False], nulls_last=True)
    return ordered["run_id"].head(limit).to_list()


def write(lin: Lineage, out: Path, fmt: str = "md", by: list[str] | None = None, plot: bool = True,
          detail: int = 12, log=print, bench: list[Path] = ()) -> Path:
    """Write tables (CSV always), figures and report.{md,html} into `out`; returns the report path.
    bench: avo.bench runs of committed versions (avo.analysis.rebench), read in as their own section."""
    out.mkdir(parents=True, exist_ok=True)
    runs = tables.runs_summary(lin)
    by = by or lin.sweep_keys
    sweep = tables.sweep_summary(lin, by or None, runs) if len(runs) > 1 else None
    commits = tables.commits(lin).collect()
    best = tables.best_configs(lin).collect()
    runs.write_csv(out / "runs.csv")
    cost.by_stage(lin).write_csv(out / "cost.csv")
    crew.per_worker(lin).join(crew.gpu_busy(lin).select("run_id", "timed", "busy"), on="run_id").write_csv(
        out / "workers.csv")
    crew.per_island(lin).write_csv(out / "islands.csv")
    commits.drop("configs").write_csv(out / "commits.csv")
    timed = rebench.load(list(bench), runs) if bench else None
    if timed is not None:
        timed.write_csv(out / "rebench.csv")
    best.write_csv(out / "best_configs.csv")
    if sweep is not None:
        sweep.write_csv(out / "sweep.csv")
    log(f"tables: {out}/runs.csv, commits.csv, best_configs.csv, workers.csv, islands.csv, cost.csv"
        + (", sweep.csv" if sweep is not None else ""))
    if fmt == "csv":
        return out / "runs.csv"
    doc = _Doc(fmt, out)
    doc.h(1, f"AVO lineage report: {len(runs)} run(s)")
    for w in lin.warnings:
        doc.p(f"Warning: {w}")
    doc.h(2, "Runs")
    doc.p("x_v0 [lo, hi]: the best version's speed over its run's v0, the chain of paired ratios its commits were "
          "timed with (avo.history); its_tflops: the best's own evaluation, with cuDNN and FA2 timed in it. The "
          "outcome columns add up to `attempts`.")
    if len(runs) > 1:
        doc.p(f"Note: {tables.ACROSS_RUNS}.")
    doc.table(run_table(runs, by or []))
    busy = crew.gpu_busy(lin)
    several = busy.filter(pl.col("workers") > 1)["run_id"].to_list()  # search.workers > 1
    if several:
        doc.h(2, "Workers")
        doc.p("Wall time is the union of the attempts' spans; `timed` is the fraction of it the GPU spent in "
              "timed stages (under the device lock), `busy` adds the correctness checks.")
        doc.table(busy.filter(pl.col("run_id").is_in(several)))
        doc.table(crew.per_worker(lin).filter(pl.col("run_id").is_in(several)))
        islands = busy.filter(pl.col("islands") > 1)["run_id"].to_list()
        if islands:
            doc.h(2, "Islands")
            doc.p("Each island is one lineage from the shared seed v0; `migrants_in` counts the copies of the best "
                  "version of all islands it received (search.migrate_every), which are neither attempts nor commits.")
            doc.table(crew.per_island(lin).filter(pl.col("run_id").is_in(islands)))
    doc.h(2, "Cost per evaluation")
    doc.p("Median seconds per attempt by outcome: the worker's stage clocks, and `eval_s`, the whole "
          "evaluation as the search waited for it (`other_s`: hand-over, lock waits, records).")
    doc.table(cost.by_stage(lin))
    if sweep is not None:
        doc.h(2, "Sweep by " + ", ".join(by or ["kernel", "group", "agent"]))
        doc.table(sweep_table(sweep, by or ["kernel", "group", "agent"]))
        if plot:
            doc.image(plots.sweep(lin, out / "plots" / "sweep.png", by or None, runs))
    chosen = detail_runs(runs, detail)
    if len(chosen) < len(runs):
        doc.p(f"Sections below: the {len(chosen)} runs whose best gained most over their v0 (--detail).")
    sup = lin.supervisor.collect()
    for i, run_id in enumerate(chosen, 1):
        r = runs.filter(pl.col("run_id") == run_id).row(0, named=True)
        log(f"[{i}/{len(chosen)}] report section for {r['name']} ({run_id})")
        doc.h(2, f"Run {r['name']} ({run_id})")
        doc.p(f"{r['run_dir']}: kernel {r['kernel']}, group {r['group']}, agent {r['agent']}, "
              f"{r['attempts']} attempts, {r['commits']} commits, best v{r['best_version']}{_proved(r)}.")
        if (r["heads"] or 1) > 1:
            doc.p(f"Note: {NOT_SIDE_BY_SIDE.format(n=r['islands'])}.")
        if plot:
            d = out / "plots" / re.sub(r"[^\w.-]", "_", run_id)
            drawn = {name: draw(lin, run_id, d / f"{name}.png") for name, draw in (
                ("trajectory", plots.trajectory), ("progress", plots.progress), ("configs", plots.config_bars),
                ("outcomes", plots.outcomes))}
            if run_id in several:
                drawn["commits_by_worker"] = crew.plot_commits(lin, run_id, d / "commits_by_worker.png")
            if timed is not None:
                drawn["rebench"] = rebench.plot(timed.filter(pl.col("run_id") == run_id), d / "rebench.png")
            if drawn["trajectory"] is None and r["best_score"] is not None:
                doc.p(f"Only v{r['best_version']} has been timed side by side so far: no trajectory to draw.")
            for path in drawn.values():
                doc.image(path)
        doc.h(3, "Best version against cuDNN and FA2 (in its own evaluation)")
        doc.table(config_table(best.filter(pl.col("run_id") == run_id)))
        if timed is not None and len(timed.filter(pl.col("run_id") == run_id)):
            doc.h(3, "Versions timed side by side (avo.bench)")
            doc.table(rebench.table(timed.filter(pl.col("run_id") == run_id)))
        doc.h(3, "Committed versions")
        doc.table(commit_table(commits.filter(pl.col("run_id") == run_id)))
        s = sup.filter(pl.col("run_id") == run_id).sort("at")
        doc.h(3, f"Supervisor interventions ({len(s)})")
        if len(s):
            island = [pl.col("island").fill_null(0)] if (s["island"].fill_null(0) > 0).any() else []
            doc.table(s.select("step", *island, "reason", pl.col("directive").str.slice(0, 300), "operator", "at"))
        doc.h(3, "Best version against the seed")
        doc.code(best_diff(lin, run_id), "diff")
    path = out / f"report.{fmt}"
    atomic_write_text(path, doc.text())
    log(f"report: {path}")
    return path
