"""The lineage stays durable: compaction checks what it wrote before deleting anything, compacted files carry
their checksum, and a run whose history cannot be read back stops with a message instead of starting over."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from avo import lineage, schema
from tests.conftest import ROOT


def _row(step: int, attempt: int = 0) -> dict:
    now = datetime.now(timezone.utc)
    return {"run_id": "r", "step": step, "attempt": attempt, "candidate_id": f"{step}.{attempt}",
            "decision": "seed" if step == 0 else "not_faster", "status": "ok", "committed": step == 0,
            "version": 0 if step == 0 else None, "message": "x" * 200, "started_at": now, "finished_at": now}


def _write(run_dir: Path, steps: int) -> None:
    for s in range(steps):
        lineage.append(run_dir, _row(s))


def _files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in lineage.lineage_dir(run_dir).iterdir() if p.is_file())


def test_compacted_file_names_its_checksum_and_keeps_every_row(tmp_path):
    _write(tmp_path, 5)
    out = lineage.compact(tmp_path, full=True)
    assert _files(tmp_path) == [out.name]
    assert out.name.startswith("chunk-s00000-a00-s00004-a00-")
    assert out.name.removesuffix(".parquet").rsplit("-", 1)[1] == hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    assert lineage.read_run(tmp_path)["candidate_id"].to_list() == [f"{s}.0" for s in range(5)]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_compacted_file_stops_the_reader_and_is_left_alone(tmp_path, damage):
    _write(tmp_path, 5)
    chunk = lineage.compact(tmp_path, full=True)
    data = bytearray(chunk.read_bytes())
    if damage == "truncate":  # a copy cut short
        data = data[:len(data) // 2]
    else:  # one byte changed inside the data pages: the footer still reads
        data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(lineage.LineageError) as e:
        lineage.read_run(tmp_path)
    msg = str(e.value)
    assert str(chunk) in msg and "s00000-a00 to s00004-a00" in msg and "\n" not in msg
    assert "restore that file from a copy" in msg and "instead of starting again from its seed" in msg
    lineage.append(tmp_path, _row(5))
    later = lineage.compact(tmp_path, full=True)  # later attempts are compacted on their own ...
    assert _files(tmp_path) == sorted([chunk.name, later.name]) and "s00005-a00-s00005-a00" in later.name
    assert chunk.read_bytes() == bytes(data)  # ... and nothing is merged with, or past, the damaged file


def test_a_chunk_left_by_an_older_version_without_checksum_still_reads(tmp_path):
    _write(tmp_path, 3)
    chunk = lineage.compact(tmp_path, full=True)
    old = chunk.with_name("chunk-s00000-a00-s00002-a00.parquet")
    chunk.rename(old)
    assert len(lineage.read_run(tmp_path)) == 3
    lineage.append(tmp_path, _row(3))
    merged = lineage.compact(tmp_path, full=True)
    assert _files(tmp_path) == [merged.name] and len(lineage.read_run(tmp_path)) == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real file system that fills up (needs root, like the Slurm cluster)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_compaction_on_a_full_disk_keeps_the_parts(small_disk, capsys):
    run = small_disk / "run"
    _write(run, 6)
    before = _files(run)
    _fill(small_disk / "filler")
    assert lineage.compact(run, full=True) is None
    assert "not compacting 6 files" in capsys.readouterr().err
    assert _files(run) == before  # the parts, and no partial chunk or temp file
    assert len(lineage.read_run(run)) == 6
    (small_disk / "filler").unlink()
    assert lineage.compact(run, full=True) is not None and len(lineage.read_run(run)) == 6


def test_a_resumed_run_with_a_damaged_history_stops_with_one_line_and_recovers_from_a_copy(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "avo.launch", "harness=compile", "seed=naive", "search.attempts_per_step=1",
            f"hydra.run.dir={run}", f"harness.cache_dir={tmp_path}/cache"]
    first = subprocess.run([*args, "search.max_steps=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    [chunk] = lineage.lineage_dir(run).glob("*.parquet")  # a finished run is one compacted file
    copy = tmp_path / chunk.name
    shutil.copy(chunk, copy)
    chunk.write_bytes(copy.read_bytes()[:-100])  # cut short
    again = subprocess.run([*args, "search.max_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and again.stderr.startswith(f"avo: error: {chunk} is damaged"), again.stderr
    assert [p.name for p in lineage.lineage_dir(run).glob("*.parquet")] == [chunk.name]  # nothing new, no seed
    shutil.copy(copy, chunk)  # the advice: restore the file from a copy
    resumed = subprocess.run([*args, "search.max_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    df = lineage.read_run(run)
    assert df["step"].to_list() == [0, 1, 2] and df["candidate_id"].is_unique().all()


def test_rows_written_before_the_paired_columns_still_read(tmp_path):
    """Runs recorded before schema 2 (no paired columns, no per-config samples) resume and analyse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    new = {"stage", "screen_s", "paired_ratio", "paired_lo", "paired_hi", "incumbent_score", "anchor_ratio",
           "anchor_lo", "anchor_hi"}
    old_cfg = pa.struct([f for f in schema.CONFIG_STRUCT if f.name in
                         ("key", "tflops", "ms", "ms_p10", "ms_p90", "cudnn_tflops", "fa2_tflops", "max_err")])
    before = pa.schema([pa.field("configs", pa.list_(old_cfg)) if f.name == "configs" else f
                        for f in schema.SCHEMA if f.name not in new])
    row = {f.name: None for f in before}
    row.update(run_id="r", step=0, attempt=0, candidate_id="00000.00", committed=True, decision="seed", status="ok",
               configs=[{"key": "a", "tflops": 1.0}], schema_version=1)
    (tmp_path / "lineage").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=before), tmp_path / "lineage" / "part-s00000-a00.parquet")
    df = lineage.read_run(tmp_path)
    assert df["configs"][0][0]["tflops"] == 1.0 and df["configs"][0][0]["samples"] is None
    assert df["paired_lo"].to_list() == [None] and lineage.scan([tmp_path]).collect().height == 1
    from avo.analysis import load  # the analysis reads them the same one way

    assert load([tmp_path], warn=lambda m: None).attempts.collect()["configs"][0][0]["tflops"] == 1.0


def test_atomic_writes_are_readable_by_collaborators_unless_told_otherwise(tmp_path):
    from avo.fsutil import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "run.json", "{}")
        atomic_write_text(tmp_path / "secret", "x", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_one_row_builder_fills_exactly_the_schema(tmp_path):
    from types import SimpleNamespace

    from avo.types import ConfigResult, EvalResult, Problem, Proposal, Shape, Status, Version

    shape = Shape(1, 8, 8, 2, 2, 64, False)
    row = schema.attempt_row(
        run_id="r", step=3, attempt=1, parent=Version(2, "00002.00", "", 5.0, []), version=3, decision="committed",
        result=EvalResult(Status.OK, ranked=True, score=6.0, configs=[ConfigResult("k", 6.0)], paired_ratio=1.2),
        proposal=Proposal("src", "msg"), operator=SimpleNamespace(name="mutation", model=""),
        problem=Problem("mha", 2, 2, 64, (shape,), (shape,)), directive=None, started=None, propose_s=0.1,
        source_sha="abc")
    assert set(row) | {"schema_version"} == set(schema.SCHEMA.names)
    assert (row["candidate_id"], row["parent_id"], row["committed"], row["best_before"]) == ("00003.01", "00002.00",
                                                                                           True, 5.0)
    lineage.append(tmp_path, {**row, "started_at": row["finished_at"]})
    assert lineage.read_run(tmp_path)["paired_ratio"].to_list() == [1.2]


def test_rows_kept_in_memory_stay_in_few_chunks_and_whole():
    """The search appends a row at a time for weeks; unbounded chunks made each append and read
    slower (21 ms an append at 4000 rows and growing)."""
    frame = schema.to_frame([])
    n = 3 * schema.MAX_CHUNKS + 5
    for i in range(n):
        frame = schema.extended(frame, [{"run_id": "r", "step": i, "attempt": 0, "candidate_id": f"{i:05d}.00",
                                          "configs": [{"key": "k", "tflops": float(i)}]}])
        assert frame.n_chunks() <= schema.MAX_CHUNKS
    assert frame["step"].to_list() == list(range(n)) and frame.schema == schema.to_frame([]).schema
    assert frame["configs"].list.get(0).struct.field("tflops").to_list() == [float(i) for i in range(n)]


def test_a_write_without_room_is_one_line_naming_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from avo.errors import StorageError
    from avo.fsutil import atomic_write_bytes

    def fsync(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as e:
        atomic_write_bytes(tmp_path / "part.parquet", b"x" * 100)
    assert str(e.value).startswith(f"cannot write {tmp_path / 'part.parquet'}: Disk quota exceeded; free space")
    assert e.value.errno == errno.EDQUOT and isinstance(e.value, OSError) and not list(tmp_path.iterdir())
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as e:  # any other failure is itself, unchanged
        atomic_write_bytes(tmp_path / "part.parquet", b"x")
    assert type(e.value) is OSError and e.value.errno == errno.EIO


def test_a_full_disk_stops_the_search_with_one_line_and_the_same_command_resumes(small_disk, tmp_path):
    run = small_disk / "run"
    args = [sys.executable, "-m", "avo.launch", "harness=compile", "seed=naive", "search.attempts_per_step=1",
            f"hydra.run.dir={run}", f"harness.cache_dir={tmp_path}/cache"]
    first = subprocess.run([*args, "search.max_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    _fill(small_disk / "filler")
    full = subprocess.run([*args, "search.max_steps=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("avo: error:")]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device; free space or raise the quota" in errors[0]
    assert len(lineage.read_run(run)) == 3 and not list(run.rglob("*.tmp"))  # nothing recorded is lost
    (small_disk / "filler").unlink()
    again = subprocess.run([*args, "search.max_steps=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    df = lineage.read_run(run)
    assert df["step"].to_list() == [0, 1, 2, 3, 4] and df["candidate_id"].is_unique().all()


def _filled(cls, **given):
    """An instance of a result dataclass with every field set to a value that is not its default."""
    import types
    import typing
    from dataclasses import fields
    from enum import Enum

    from avo.types import ConfigResult

    values = {}
    for i, f in enumerate(fields(cls)):
        hint = typing.get_type_hints(cls)[f.name]
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if isinstance(hint, types.UnionType) \
            else hint
        if f.name in given:
            values[f.name] = given[f.name]
        elif typing.get_origin(base) is list:
            values[f.name] = [_filled(ConfigResult)] if typing.get_args(base)[0] is ConfigResult else [1.5 + i, 2.5]
        elif isinstance(base, type) and issubclass(base, Enum):
            values[f.name] = list(base)[0]
        else:
            values[f.name] = {bool: True, int: 7 + i, float: 1.25 + i, str: f"v{i}"}[base]
    return cls(**values)


def test_every_result_field_is_a_column_written_and_read_back(tmp_path):
    """A field added to EvalResult, ConfigResult or Proposal reaches the lineage without a change to avo.schema
    (or is named in NOT_STORED with where it goes): the row is derived from the dataclasses."""
    from dataclasses import fields
    from types import SimpleNamespace

    from avo.types import ConfigResult, EvalResult, Problem, Proposal, Redirect, Shape

    for cls, names in ((EvalResult, schema.SCHEMA.names), (Proposal, schema.SCHEMA.names),
                       (ConfigResult, schema.CONFIG_STRUCT.names), (Redirect, schema.SUPERVISOR_SCHEMA.names)):
        missing = [f.name for f in fields(cls) if f.name not in names and f"{cls.__name__}.{f.name}" not in
                   schema.NOT_STORED]
        assert not missing, f"{cls.__name__} fields with no column: {missing}"
    result, proposal = _filled(EvalResult), _filled(Proposal, meta={"k": 1})
    shape = Shape(1, 8, 8, 2, 2, 64, False)
    row = schema.attempt_row(run_id="r", step=1, attempt=0, parent=None, version=None, decision="not_faster",
                             result=result, proposal=proposal, operator=SimpleNamespace(name="op", model=""),
                             problem=Problem("mha", 2, 2, 64, (shape,), (shape,)), directive="d",
                             started=datetime.now(timezone.utc), propose_s=0.5, source_sha="abc")
    lineage.append(tmp_path, row)
    back = lineage.read_run(tmp_path).row(0, named=True)
    for f in fields(EvalResult):
        if f.name in schema.RESULT:
            want = getattr(result, f.name)
            want = want.value if f.name == "status" else [vars(c) for c in want] if f.name == "configs" else want
            assert back[f.name] == want, f.name
    assert {k: back[k] for k in schema.PROPOSED} == {k: getattr(proposal, k) for k in schema.PROPOSED}
    import json

    extra = json.loads(back["extra"])
    assert extra["k"] == 1 and extra["log_tail"] == result.log  # where NOT_STORED says they go


def test_every_column_is_documented_and_docs_lineage_md_holds_the_generated_tables():
    from avo.types import Decision

    assert set(schema.SCHEMA.names) <= set(schema.DOCS)
    assert set(schema.SUPERVISOR_SCHEMA.names) <= set(schema.DOCS) | set(schema.SUPERVISOR_DOCS)
    assert all(f"`{d.value}`" in schema.DOCS["decision"] for d in Decision)
    text = (ROOT / "docs" / "lineage.md").read_text()
    for table in (schema.markdown(), schema.markdown(schema.SUPERVISOR_SCHEMA, schema.SUPERVISOR_DOCS)):
        assert table in text, "docs/lineage.md is out of date: paste `python -m avo.schema` into it"
    documented = {ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and ln.count("|") == 4}
    assert documented - {"column"} == set(schema.SCHEMA.names) | set(schema.SUPERVISOR_SCHEMA.names)
