"""Find run directories below the given paths and open their lineage lazily.

Problems a researcher can meet (no lineage, a corrupt or truncated part file, files from another
schema version, a broken run.json) become one warning line each; whatever is readable is still used.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from avo import lineage
from avo.schema import SCHEMA, SUPERVISOR_SCHEMA

IGNORED_OVERRIDES = ("run_dir", "resume", "hydra.", "launcher")  # say where a run lives, not what it tests
REPLICATE_KEYS = ("rng",)  # repeat a cell of a sweep; never a default grouping key


class AnalysisError(RuntimeError):
    """Nothing to analyse; the message says what was looked for."""


@dataclass
class Lineage:
    """Every attempt, supervisor intervention and run.json found below some directories."""
    attempts: pl.LazyFrame        # lineage schema + run_dir, one row per (run_id, candidate_id), unordered
    supervisor: pl.LazyFrame      # run_id, step, reason, directive, operator, at
    runs: pl.DataFrame            # one row per run: run_id, run_dir, metadata and one column per override key
    override_keys: list[str]      # override keys present in run.json files, in first-seen order
    warnings: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list, repr=False)
    dedupe: bool = False
    note: object = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # frames tables.py computed once per load

    def salvage(self, error: Exception) -> None:
        """A file passed the footer check but its data does not decode: read file by file, skip the bad ones."""
        self.note(f"reading file by file after: {str(error).splitlines()[0]}")
        good = []
        for f in self.files:
            try:
                pl.read_parquet(f)
                good.append(f)
            except (OSError, pl.exceptions.PolarsError) as e:
                self.note(f"skipping damaged lineage file {f}: {str(e).splitlines()[0]}")
        self.attempts = _attempts(good, self.runs, self.dedupe, self.note)
        self.files = good

    def cached(self, name: str, build) -> pl.DataFrame:
        if name not in self.cache:
            self.cache[name] = build()
        return self.cache[name]

    @property
    def sweep_keys(self) -> list[str]:
        """Override keys whose value differs between runs (all keys when only one run), replicates excluded."""
        keys = [k for k in self.override_keys if k not in REPLICATE_KEYS]
        if len(self.runs) < 2:
            return keys
        return [k for k in keys if self.runs[k].n_unique() > 1]


def _run_dirs(root: Path) -> list[Path]:
    if (root / "lineage").is_dir():
        return [root]
    return sorted(p.parent for p in root.rglob("lineage")
                  if p.is_dir() and ((p.parent / "run.json").exists() or any(p.glob("*.parquet"))))


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """Hydra task overrides ("agent=qwen", "+x=1", "~y") as {key: value}; deletions and paths dropped."""
    out = {}
    for o in overrides or []:
        if "=" not in o or o.startswith("~"):
            continue
        key, value = o.split("=", 1)
        key = key.lstrip("+")
        if key.startswith(IGNORED_OVERRIDES):
            continue
        out[key] = value
    return out


def _run_row(run_dir: Path, warn) -> dict:
    try:
        info = lineage.read_run_info(run_dir)
    except ValueError as e:
        warn(str(e))
        info = None
    if info is None:
        warn(f"{run_dir} has no readable run.json: its run_id comes from the lineage, its overrides are unknown")
        info = {}
    meta = {k: None if info.get(k) is None else str(info[k])
            for k in ("run_id", "agent", "operator", "model", "kernel", "group", "seed", "started_at")}
    return {**meta, "run_dir": str(run_dir), "name": run_dir.name,
            "overrides": parse_overrides(info.get("overrides") or [])}


def load(paths, warn=None) -> Lineage:
    """Open every run below `paths` (run directories or sweep directories, any depth)."""
    warnings: list[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        (warn or (lambda m: print(f"avo.analyze: {m}", file=sys.stderr)))(msg)

    run_dirs: list[Path] = []
    for root in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if not root.exists():
            note(f"{root} does not exist")
            continue
        found = _run_dirs(root)
        if not found:
            note(f"{root} holds no lineage (looked for {root}/lineage/ and */lineage/ below it)")
        run_dirs += [d for d in found if d not in run_dirs]
    runs, files, sup_files, overlap = [], [], [], False
    for d in run_dirs:
        parts = sorted(f for f in (d / "lineage").glob("*.parquet") if f.name.startswith(("part-", "chunk-")))
        if not parts:
            note(f"{d}/lineage holds no part-*.parquet or chunk-*.parquet files")
            continue
        row = _run_row(d, note)
        if row["run_id"] is None:
            try:
                row["run_id"] = pl.read_parquet(parts[-1], columns=["run_id"])["run_id"][0]
            except (OSError, pl.exceptions.PolarsError, pa.ArrowException, IndexError):
                row["run_id"] = d.name
        runs.append(row)
        files += parts
        # parts beside chunks: a compaction may have stopped before deleting them, so rows can repeat
        overlap |= len({p.name[:5] for p in parts}) > 1
        sup_files += sorted((d / "lineage" / "supervisor").glob("part-*.parquet"))
    if not runs:
        raise AnalysisError("no lineage found below " + ", ".join(map(str, [paths] if isinstance(paths, (str, Path))
                                                                        else paths)))
    keys = list(dict.fromkeys(k for r in runs for k in r["overrides"]))
    table = pl.DataFrame([{**{k: v for k, v in r.items() if k != "overrides"},
                           **{k: r["overrides"].get(k) for k in keys}} for r in runs],
                         infer_schema_length=None)
    dup = table.filter(pl.col("run_id").is_duplicated())
    if len(dup):
        note(f"run_id {dup['run_id'][0]} appears in several directories ({', '.join(dup['run_dir'])}); "
             "rows are merged by candidate_id")
        table = table.unique("run_id", keep="first", maintain_order=True)
        overlap = True
    supervisor = lineage.open_files(sup_files, SUPERVISOR_SCHEMA, note)
    return Lineage(_attempts(files, table, overlap, note), supervisor, table, keys, warnings, files, overlap, note)


def _attempts(files: list[Path], runs: pl.DataFrame, dedupe: bool, note) -> pl.LazyFrame:
    attempts = lineage.open_files(files, SCHEMA, note)
    if dedupe:
        attempts = attempts.unique(subset=["run_id", "candidate_id"], keep="first")
    return attempts.join(runs.lazy().select("run_id", "run_dir"), on="run_id", how="left")
