"""Append-only Parquet lineage: one row per attempt (avo.schema), sources content-addressed beside it.

Layout of <run_dir>/lineage/:
  part-s{step:05d}-a{attempt:02d}.parquet   one attempt, written atomically
  chunk-{first}-{last}-{sha}.parquet        compacted parts; {sha}: the first 16 hex digits of the
                                            file's sha256 (readers dedupe rows by candidate_id)
  sources/<sha256>.cu                       every evaluated source
  supervisor/part-*.parquet                 supervisor interventions
The population is a query over these files; nothing is ever updated in place. A compacted file is read
back and checked before the files it replaces are deleted; a run whose files cannot be read back stops
(LineageError) instead of starting again from its seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from avo.errors import LineageError
from avo.fsutil import atomic_write_bytes, atomic_write_text
from avo.schema import SCHEMA, SCHEMA_VERSION, SUPERVISOR_SCHEMA, to_frame
from avo.types import sha256  # noqa: F401 - the lineage's name for it

# rows written before a column or a per-config field existed read it as null
OLDER_ROWS = pl.ScanCastOptions(missing_struct_fields="insert", extra_struct_fields="ignore")
COMPACT_EVERY = 64
MERGE_CHUNKS = 16


def lineage_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "lineage"



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


def append(run_dir: str | Path, row: dict) -> Path:
    """Write one attempt atomically; compacts older parts every COMPACT_EVERY attempts."""
    row = {**row, "schema_version": SCHEMA_VERSION, "extra": row.get("extra") or "{}"}
    path = lineage_dir(run_dir) / f"part-s{row['step']:05d}-a{row['attempt']:02d}.parquet"
    atomic_write_bytes(path, _to_parquet([row], SCHEMA))
    parts = sorted(lineage_dir(run_dir).glob("part-*.parquet"))
    if len(parts) >= COMPACT_EVERY:
        compact(run_dir)
    return path


def append_supervisor(run_dir: str | Path, row: dict) -> dict:
    """Write one intervention atomically; returns the row as written."""
    row = {"at": datetime.now(timezone.utc), **row}
    path = lineage_dir(run_dir) / "supervisor" / f"part-s{row['step']:05d}-{row['at'].strftime('%H%M%S%f')}.parquet"
    atomic_write_bytes(path, _to_parquet([row], SUPERVISOR_SCHEMA))
    return row


_CHUNK = re.compile(r"chunk-(s\d{5}-a\d{2})-(s\d{5}-a\d{2})(?:-([0-9a-f]{16}))?\.parquet")
_PART = re.compile(r"part-(s\d{5}-a\d{2})\.parquet")


def _span(path: Path) -> tuple[str, str]:
    """(first, last) attempt a part or chunk file holds, as sXXXXX-aYY."""
    if m := _CHUNK.fullmatch(path.name):
        return m.group(1), m.group(2)
    if m := _PART.fullmatch(path.name):
        return m.group(1), m.group(1)
    raise ValueError(f"{path.name} is not a lineage part or chunk file name")


def damage(path: Path) -> str | None:
    """Why a part or chunk file cannot be trusted (checksum in its name, Parquet footer), or None."""
    m = _CHUNK.fullmatch(path.name)
    try:
        if m and m.group(3):
            found = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            if found != m.group(3):
                return f"its sha256 starts {found}, not {m.group(3)} as when it was written: cut short or altered"
        pq.read_metadata(path)
        return None
    except (OSError, pa.ArrowException) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def compact(run_dir: str | Path, full: bool = False, warn=None) -> Path | None:
    """Merge part files into one chunk, and chunks into one once there are MERGE_CHUNKS of them
    (or always, with full=True: a finished run then reads as one file).

    A merge writes the new file atomically, reads it back and compares it with its inputs, and only
    then removes them; a crash in between leaves duplicates, which readers drop by candidate_id. A
    damaged input, a failed write (full disk) or a failed check leaves every file as it was.
    """
    out = _merge(sorted(lineage_dir(run_dir).glob("part-*.parquet")), run_dir, warn)
    chunks = sorted(lineage_dir(run_dir).glob("chunk-*.parquet"))
    if len(chunks) >= (2 if full else MERGE_CHUNKS):
        out = _merge(chunks, run_dir, warn) or out
    return out


def _merge(files: list[Path], run_dir, warn=None) -> Path | None:
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not files or any(damage(p) for p in files):
        return None  # nothing to do, or a damaged file: reading the run reports it; change nothing here
    out = None
    try:
        table = pa.concat_tables([pq.read_table(p) for p in files], promote_options="permissive")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()[:16]
        out = lineage_dir(run_dir) / f"chunk-{_span(files[0])[0]}-{_span(files[-1])[1]}-{digest}.parquet"
        atomic_write_bytes(out, data)
        if damage(out) or not pq.read_table(out).equals(table):
            raise OSError(f"{out.name} does not read back as written")
    except (OSError, ValueError, pa.ArrowException) as e:
        if out is not None and out not in files:
            out.unlink(missing_ok=True)
        warn(f"avo: lineage: not compacting {len(files)} files in {lineage_dir(run_dir)}: {e}; they stay as they are")
        return None
    for p in files:
        if p != out:
            p.unlink(missing_ok=True)
    return out


def _damage_message(path: Path, why: str) -> str:
    try:
        first, last = _span(path)
        what = f"the attempts {first} to {last}" if first != last else f"the attempt {first}"
    except ValueError:
        what = "some attempts"
    return (f"{path} is damaged ({why}), so {what} of this run cannot be read back. "
            f"The run stops instead of starting again from its seed: restore that file from a copy, or move "
            f"it out of {path.parent} to go on without those attempts")


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
            why = damage(f)
            if why:
                warn(f"avo: skipping damaged lineage file {f}: {why}")
            else:
                files.append(f)
    return files


def _footer(path: Path) -> dict | str:
    """The file's schema from its footer (cheap: no data read), or why it cannot be read."""
    try:
        return pl.read_parquet_schema(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _older_struct(have, want) -> bool:
    """A list of structs whose fields the target has all of: OLDER_ROWS fills in the rest."""
    if not (isinstance(have, pl.List) and isinstance(want, pl.List)):
        return False
    h, w = have.inner, want.inner
    return isinstance(h, pl.Struct) and isinstance(w, pl.Struct) and \
        {f.name: f.dtype for f in h.fields}.items() <= {f.name: f.dtype for f in w.fields}.items()


def open_files(files: list[Path], schema: pa.Schema, warn=None) -> pl.LazyFrame:
    """The one way lineage files are read: lazily, against `schema`. Columns (and per-config fields)
    a file lacks read as null; a file whose column types differ otherwise is cast file by file; an
    unreadable file is reported and skipped. Each kind of drift is reported once per folder."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    target = pl.from_arrow(schema.empty_table()).schema
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        footers = list(pool.map(_footer, files))
    fast, slow, drift = [], [], {}
    for f, have in zip(files, footers, strict=True):
        if isinstance(have, str):
            warn(f"skipping unreadable lineage file {f}: {have}")
            continue
        missing = tuple(c for c in target if c not in have)
        extra = tuple(c for c in have if c not in target)
        retyped = tuple(c for c in target if c in have and have[c] != target[c]
                        and not _older_struct(have[c], target[c]))
        if missing or extra or retyped:
            drift.setdefault((f.parent, missing, extra, retyped), []).append(f)
        (slow if retyped else fast).append(f)
    for (where, missing, extra, retyped), fs in drift.items():
        parts = [f"missing {', '.join(missing)} (read as null)" if missing else "",
                 f"extra {', '.join(extra)} (ignored)" if extra else "",
                 f"other types for {', '.join(retyped)} (cast)" if retyped else ""]
        warn(f"{len(fs)} file(s) in {where} differ from lineage schema v{SCHEMA_VERSION}: "
             + "; ".join(p for p in parts if p))
    frames = []
    if fast:
        frames.append(pl.scan_parquet(fast, schema=target, missing_columns="insert", extra_columns="ignore",
                                      cast_options=OLDER_ROWS))
    for f in slow:
        df = pl.read_parquet(f)
        cols = [(pl.col(c).cast(t, strict=False) if c in df.columns else pl.lit(None, t)).alias(c)
                for c, t in target.items()]
        frames.append(df.lazy().select(cols))
    return pl.concat(frames, how="vertical") if frames else pl.LazyFrame(schema=target)


def scan(paths, warn=None) -> pl.LazyFrame:
    """All attempts below the given directories, one row per candidate (schema drift tolerated)."""
    files = lineage_files(paths, "[pc][ah]*.parquet", warn)  # part-* and chunk-*
    return open_files(files, SCHEMA, warn).unique(subset=["run_id", "candidate_id"], keep="first",
                                                  maintain_order=True)


def scan_supervisor(paths, warn=None) -> pl.LazyFrame:
    return open_files(lineage_files(paths, "supervisor/*.parquet", warn), SUPERVISOR_SCHEMA, warn)


def read_run(run_dir: str | Path) -> pl.DataFrame:
    """One run's attempts in order (only its own lineage/, not nested runs).

    Every part and chunk file must read back: a damaged one raises LineageError, since a resumed run
    would otherwise start again from its seed with its history out of sight."""
    lin = lineage_dir(run_dir)
    files = []
    for f in sorted([*lin.glob("part-*.parquet"), *lin.glob("chunk-*.parquet")]):
        why = damage(f)
        if why and f.exists():
            raise LineageError(_damage_message(f, why))
        if not why:  # (a file gone since the listing was merged into a chunk by a concurrent compaction)
            files.append(f)
    if not files:
        return to_frame([])
    return open_files(files, SCHEMA).unique(subset=["candidate_id"], keep="first").sort("step", "attempt").collect()


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
