"""Append-only Parquet lineage: one row per attempt, sources content-addressed beside it.

Layout of <run_dir>/lineage/:
  part-s{step:05d}-a{attempt:02d}.parquet   one attempt, written atomically
  chunk-{first}-{last}.parquet              compacted parts (readers dedupe by candidate_id)
  sources/<sha256>.cu                       every evaluated source
  supervisor/part-*.parquet                 supervisor interventions
The population is a query over these files; nothing is ever updated in place.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from avo.fsutil import atomic_write_bytes, atomic_write_text

SCHEMA_VERSION = 2
COMPACT_EVERY = 64
MERGE_CHUNKS = 16

CONFIG_STRUCT = pa.struct([("key", pa.string()), ("tflops", pa.float64()), ("ms", pa.float64()),
                           ("ms_p10", pa.float64()), ("ms_p90", pa.float64()), ("cudnn_tflops", pa.float64()),
                           ("fa2_tflops", pa.float64()), ("max_err", pa.float64()),
                           ("samples", pa.list_(pa.float64())), ("incumbent_tflops", pa.float64()),
                           ("incumbent_samples", pa.list_(pa.float64())), ("anchor_tflops", pa.float64()),
                           ("anchor_samples", pa.list_(pa.float64())), ("ratio", pa.float64()),
                           ("ratio_lo", pa.float64()), ("ratio_hi", pa.float64())])
TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("schema_version", pa.int32()), ("run_id", pa.string()), ("step", pa.int32()), ("attempt", pa.int32()),
    ("candidate_id", pa.string()), ("parent_id", pa.string()), ("version", pa.int32()),
    ("committed", pa.bool_()), ("decision", pa.string()), ("status", pa.string()), ("ranked", pa.bool_()),
    ("score", pa.float64()), ("best_before", pa.float64()), ("configs", pa.list_(CONFIG_STRUCT)),
    ("stage", pa.string()), ("screen_s", pa.float64()), ("paired_ratio", pa.float64()), ("paired_lo", pa.float64()),
    ("paired_hi", pa.float64()), ("incumbent_score", pa.float64()), ("anchor_ratio", pa.float64()),
    ("anchor_lo", pa.float64()), ("anchor_hi", pa.float64()),
    ("source_sha", pa.string()), ("operator", pa.string()), ("model", pa.string()), ("message", pa.string()),
    ("error", pa.string()), ("propose_s", pa.float64()), ("compile_s", pa.float64()), ("verify_s", pa.float64()),
    ("bench_s", pa.float64()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("llm_calls", pa.int64()), ("registers", pa.int32()), ("spill_bytes", pa.int32()),
    ("stack_bytes", pa.int32()), ("smem_bytes", pa.int32()), ("threads", pa.int32()), ("gpu", pa.string()),
    ("sm_clock_mhz", pa.float64()), ("power_w", pa.float64()), ("kernel", pa.string()), ("heads_q", pa.int32()),
    ("heads_kv", pa.int32()), ("head_dim", pa.int32()), ("group", pa.int32()), ("directive", pa.string()),
    ("started_at", TS), ("finished_at", TS), ("host", pa.string()), ("extra", pa.string()),
])
SUPERVISOR_SCHEMA = pa.schema([("run_id", pa.string()), ("step", pa.int32()), ("reason", pa.string()),
                               ("directive", pa.string()), ("operator", pa.string()), ("at", TS),
                               ("model", pa.string()), ("prompt_tokens", pa.int64()),
                               ("completion_tokens", pa.int64()), ("llm_calls", pa.int64()),
                               ("latency_s", pa.float64())])


def lineage_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "lineage"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_source(run_dir: str | Path, source: str) -> str:
    sha = sha256(source)
    path = lineage_dir(run_dir) / "sources" / f"{sha}.cu"
    if not path.exists():
        atomic_write_text(path, source)
    return sha


def read_source(run_dir: str | Path, sha: str) -> str:
    path = lineage_dir(run_dir) / "sources" / f"{sha}.cu"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"source {sha[:12]} is missing from {path.parent}") from None


def _to_parquet(rows: list[dict], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def to_frame(rows: list[dict]) -> pl.DataFrame:
    """Rows as a DataFrame with exactly the lineage schema (what read_run returns)."""
    return pl.from_arrow(pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA))


def append(run_dir: str | Path, row: dict) -> Path:
    """Write one attempt atomically; compacts older parts every COMPACT_EVERY attempts."""
    row = {**row, "schema_version": SCHEMA_VERSION, "extra": row.get("extra") or "{}"}
    path = lineage_dir(run_dir) / f"part-s{row['step']:05d}-a{row['attempt']:02d}.parquet"
    atomic_write_bytes(path, _to_parquet([row], SCHEMA))
    parts = sorted(lineage_dir(run_dir).glob("part-*.parquet"))
    if len(parts) >= COMPACT_EVERY:
        compact(run_dir)
    return path


def append_supervisor(run_dir: str | Path, row: dict) -> None:
    row = {"at": datetime.now(timezone.utc), **row}
    path = lineage_dir(run_dir) / "supervisor" / f"part-s{row['step']:05d}-{row['at'].strftime('%H%M%S%f')}.parquet"
    atomic_write_bytes(path, _to_parquet([row], SUPERVISOR_SCHEMA))


def compact(run_dir: str | Path, full: bool = False) -> Path | None:
    """Merge part files into one chunk, and chunks into one once there are MERGE_CHUNKS of them
    (or always, with full=True: a finished run then reads as one file).

    Each merge writes the new file atomically, then removes its inputs; a crash between the two
    leaves duplicates, which readers drop by candidate_id. Few, larger files keep sweep scans fast.
    """
    out = _merge(sorted(lineage_dir(run_dir).glob("part-*.parquet")), run_dir)
    chunks = sorted(lineage_dir(run_dir).glob("chunk-*.parquet"))
    if len(chunks) >= (2 if full else MERGE_CHUNKS):
        out = _merge(chunks, run_dir)
    return out


def _merge(files: list[Path], run_dir) -> Path | None:
    good = [p for p in files if _readable(p)]
    if not good:
        return None
    table = pa.concat_tables([pq.read_table(p) for p in good], promote_options="permissive")
    names = [p.stem.split("-", 1)[1] for p in good]  # part-sXXXXX-aYY / chunk-<first>-<last>
    first, last = names[0][:10], names[-1][-10:]  # sXXXXX-aYY
    out = lineage_dir(run_dir) / f"chunk-{first}-{last}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(out, buf.getvalue())
    for p in good:
        if p != out:
            p.unlink(missing_ok=True)
    return out


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowException):
        return False


def lineage_files(paths, pattern: str = "*.parquet", warn=None) -> list[Path]:
    """Every readable lineage file below the given run or sweep directories; others are reported."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    files: list[Path] = []
    for root in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if not root.exists():
            warn(f"avo: {root} does not exist")
            continue
        found = sorted(root.glob(f"lineage/{pattern}")) + sorted(root.glob(f"**/*/lineage/{pattern}"))
        for f in found:
            if f.name.startswith("."):
                continue
            if _readable(f):
                files.append(f)
            else:
                warn(f"avo: skipping corrupt lineage file {f}")
    return files


def scan(paths, warn=None) -> pl.LazyFrame:
    """All attempts below the given directories, one row per candidate (schema drift tolerated)."""
    files = lineage_files(paths, "[pc][ah]*.parquet", warn)  # part-* and chunk-*
    if not files:
        return pl.LazyFrame(schema=pl.from_arrow(SCHEMA.empty_table()).schema)
    lf = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore",
                         schema=pl.from_arrow(SCHEMA.empty_table()).schema)
    return lf.unique(subset=["run_id", "candidate_id"], keep="first", maintain_order=True)


def scan_supervisor(paths, warn=None) -> pl.LazyFrame:
    files = lineage_files(paths, "supervisor/*.parquet", warn)
    if not files:
        return pl.LazyFrame(schema=pl.from_arrow(SUPERVISOR_SCHEMA.empty_table()).schema)
    return pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore",
                           schema=pl.from_arrow(SUPERVISOR_SCHEMA.empty_table()).schema)


def read_run(run_dir: str | Path, warn=None) -> pl.DataFrame:
    """One run's attempts in order (only its own lineage/, not nested runs)."""
    files = [f for f in lineage_files([run_dir], "[pc][ah]*.parquet", warn) if f.parent.parent == Path(run_dir)]
    if not files:
        return to_frame([])
    lf = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore", schema=to_frame([]).schema)
    return lf.unique(subset=["candidate_id"], keep="first").sort("step", "attempt").collect()


def write_run_info(run_dir: str | Path, info: dict) -> None:
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=1, default=str))


def read_run_info(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the lineage itself is intact") from None
