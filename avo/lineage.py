"""Append-only Parquet lineage: one row per attempt, sources content-addressed beside it.

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
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from avo.errors import LineageError
from avo.fsutil import atomic_write_bytes, atomic_write_text

SCHEMA_VERSION = 5  # 3: worker, island; 4: device; 5: the supervisor rows' island
# rows written before a column or a per-config field existed read it as null
OLDER_ROWS = pl.ScanCastOptions(missing_struct_fields="insert", extra_struct_fields="ignore")
MAX_CHUNKS = 64  # an in-memory frame grown row by row is rechunked past this many chunks (extended)
MIGRATED = "migrated"  # the decision of a copy of another island's best (avo.islands)
COMMITS = ("committed", "seed", MIGRATED)  # decisions that add a version
ORIGINAL = pl.col("decision").ne_missing(MIGRATED)  # an attempt or the seed: not a migrant's copy of a version
STAGE_COLUMNS = ("compile_s", "verify_s", "screen_s", "bench_s")  # an evaluation's own clocks, stage by stage
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
    ("worker", pa.int32()), ("island", pa.int32()),  # which of search.workers proposed it, on which island
    ("device", pa.int32()),  # the CUDA device it was evaluated on (harness.devices); null without a GPU
])
WIDE_COLUMNS = ("configs", "message", "error", "extra")  # lists and free text: read only where needed
SUPERVISOR_SCHEMA = pa.schema([("run_id", pa.string()), ("step", pa.int32()), ("reason", pa.string()),
                               ("directive", pa.string()), ("operator", pa.string()), ("at", TS),
                               ("model", pa.string()), ("prompt_tokens", pa.int64()),
                               ("completion_tokens", pa.int64()), ("llm_calls", pa.int64()),
                               ("latency_s", pa.float64()), ("island", pa.int32())])


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


def attempt_row(*, run_id: str, step: int, attempt: int, parent, version: int | None, decision: str, result,
                proposal, operator, problem, directive: str | None, started, propose_s: float, source_sha: str,
                worker: int = 0, island: int = 0) -> dict:
    """The one place an attempt becomes a row of SCHEMA: from the search's objects (parent: the
    Version varied, result: EvalResult, proposal: Proposal, operator: name and model, problem: Problem)."""
    return {
        "run_id": run_id, "step": step, "attempt": attempt, "candidate_id": f"{step:05d}.{attempt:02d}",
        "parent_id": parent.candidate_id if parent else None, "version": version,
        "committed": decision in COMMITS, "decision": decision, "status": result.status.value,
        "ranked": result.ranked, "score": result.score, "best_before": parent.score if parent else None,
        "stage": result.stage, "screen_s": result.screen_s, "paired_ratio": result.paired_ratio,
        "paired_lo": result.paired_lo, "paired_hi": result.paired_hi, "incumbent_score": result.incumbent_score,
        "anchor_ratio": result.anchor_ratio, "anchor_lo": result.anchor_lo, "anchor_hi": result.anchor_hi,
        "configs": [vars(c) for c in result.configs], "source_sha": source_sha, "operator": operator.name,
        "model": proposal.model or operator.model, "message": proposal.message, "error": result.error,
        "propose_s": propose_s, "compile_s": result.compile_s, "verify_s": result.verify_s,
        "bench_s": result.bench_s, "prompt_tokens": proposal.prompt_tokens,
        "completion_tokens": proposal.completion_tokens, "llm_calls": proposal.llm_calls,
        "registers": result.registers, "spill_bytes": result.spill_bytes, "stack_bytes": result.stack_bytes,
        "smem_bytes": result.smem_bytes, "threads": result.threads, "gpu": result.gpu,
        "sm_clock_mhz": result.sm_clock_mhz, "power_w": result.power_w, "kernel": problem.name,
        "heads_q": problem.heads_q, "heads_kv": problem.heads_kv, "head_dim": problem.head_dim,
        "group": problem.group, "directive": directive, "started_at": started,
        "finished_at": datetime.now(timezone.utc), "host": socket.gethostname(),
        "extra": json.dumps({"log_tail": result.log[-2000:], **proposal.meta}, default=str),
        "worker": worker, "island": island, "device": result.device,
    }


def to_frame(rows: list[dict], schema: pa.Schema = SCHEMA) -> pl.DataFrame:
    """Rows as a DataFrame with exactly the given schema (the attempts' by default: what read_run returns)."""
    return pl.from_arrow(pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema))


def extended(frame: pl.DataFrame, rows: list[dict], schema: pa.Schema = SCHEMA) -> pl.DataFrame:
    """`frame` with `rows` appended: how the search keeps its rows in memory. Each append adds a chunk
    to every column, and appends and reads slow down with their number (21 ms an append at 4000 rows,
    growing without bound, against 0.2 ms): past MAX_CHUNKS the frame is made contiguous again."""
    out = pl.concat([frame, to_frame(rows, schema)])
    return out.rechunk() if out.n_chunks() > MAX_CHUNKS else out


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
