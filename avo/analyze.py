"""Tables, plots and a report from the lineage of runs or sweeps.

    python -m avo.analyze outputs/2026-01-01/12-00-00 [more run or sweep dirs] [--out DIR] [--format md|csv|html]
                          [--bench <avo.bench output of committed versions> ...]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import polars as pl

from avo.analysis import AnalysisError, load, report, summary, tables
from avo.analysis import workers as crew
from avo.errors import one_line


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m avo.analyze", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories or sweep directories (searched recursively)")
    p.add_argument("--out", type=Path, help="output directory (default: <first path>/analysis)")
    p.add_argument("--format", choices=("md", "html", "csv"), default="md",
                   help="md: report.md with PNG files; html: one self-contained file; csv: tables only")
    p.add_argument("--by", help="comma-separated override keys to group a sweep by (default: those that vary)")
    p.add_argument("--detail", type=int, default=12, help="runs given their own report section (best first)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--bench", type=Path, action="append", default=[],
                   help="an avo.bench output (folder or bench.json) of committed versions timed side by side: "
                        "their TFLOPS go into the report (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    try:
        lin = load(args.paths)
        by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
        runs = tables.runs_summary(lin)
        unknown = [k for k in by or [] if k not in runs.columns]
        if unknown:
            raise AnalysisError(f"--by {','.join(unknown)}: no such override or run column "
                                f"(override keys here: {', '.join(lin.override_keys) or 'none'})")
        print(f"avo.analyze: {len(runs)} run(s), {int(runs['attempts'].sum())} attempts "
              f"read in {time.perf_counter() - t0:.2f}s")
        keys = by or lin.sweep_keys
        cells = tables.sweep_summary(lin, keys or ["kernel", "group", "agent"], runs) if len(runs) > 1 else None
        width = min(120, max(60, shutil.get_terminal_size((80, 24)).columns))
        print(summary.text(runs, keys, cells, width))
        busy = crew.gpu_busy(lin).filter(pl.col("workers") > 1)
        if len(busy):  # search.workers > 1: who did what, and how busy the GPU was
            print(report.markdown(busy))
            print(report.markdown(crew.per_worker(lin).filter(pl.col("run_id").is_in(busy["run_id"].to_list()))))
        islands = busy.filter(pl.col("islands") > 1)["run_id"].to_list()
        if islands:  # search.islands > 1: how each lineage fared
            print(report.markdown(crew.per_island(lin).filter(pl.col("run_id").is_in(islands))))
        out = args.out or Path(args.paths[0]) / "analysis"
        report.write(lin, out, args.format, by, plot=not args.no_plots, detail=args.detail, bench=args.bench)
    except (AnalysisError, OSError) as e:
        line = one_line(e, (AnalysisError,))
        if line is None:
            raise
        print(f"avo.analyze: {line}", file=sys.stderr)
        return 2
    print(f"avo.analyze: done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
