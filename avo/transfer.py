"""Transfer: what a new lineage seeded from another run takes along besides the source.

The source run's agent notes (its persistent memory) are copied, and the lessons of its
committed versions (what each changed and what it gained) are written as markdown into the new
run's agent/ folder. A transferred seed that fails on the new variant (e.g. an MHA kernel that
ignores the KV head mapping under GQA) does not stop the search: it is recorded as step 0,
and the operator's first job is to adapt it (see `failed_seed`); the first correct candidate
becomes v0 of the new lineage.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

from avo import lineage
from avo.history import chains
from avo.schema import ORIGINAL

KNOWLEDGE_FILES = ("agent/notes.md",)


def carry_knowledge(src_run: Path, dst_run: Path) -> list[Path]:
    """Copy the source run's notes and write its lessons into the new run, once each."""
    copied = []
    for rel in KNOWLEDGE_FILES:
        src, dst = Path(src_run) / rel, Path(dst_run) / rel
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    lessons = write_lessons(src_run, dst_run)
    return copied + ([lessons] if lessons else [])


def lessons_markdown(src_run: Path) -> tuple[str, str] | None:
    """(source run id, markdown): one section per committed version, with its message and what the lineage
    proved about it (its paired ratio over its parent, timed side by side, and their chain over v0)."""
    rows = chains(lineage.read_run(src_run)).filter(ORIGINAL)
    if rows.is_empty():  # (a migrant repeats a version of another island: search.islands)
        return None
    info = lineage.read_run_info(src_run) or {}
    run_id = info.get("run_id") or rows["run_id"][0]
    first = rows.row(0, named=True)
    out = [f"# Lessons from run {run_id}\n",
           f"Committed versions of {first['kernel']} (Hq={first['heads_q']}, Hkv={first['heads_kv']}, "
           f"d={first['head_dim']}) in {Path(src_run).resolve()}, oldest first. Each kept a correct kernel and "
           "passed the commit rule timed side by side with the version before it; the messages say what changed. "
           "Scores are each version's own evaluation: compare versions by their ratios, not their scores.\n"]
    by_id = {r["candidate_id"]: r for r in rows.iter_rows(named=True)}
    for r in rows.iter_rows(named=True):
        parent = by_id.get(r["parent_id"])
        proved = ""
        if r["paired_ratio"] is not None and parent is not None:
            proved = (f" x{r['paired_ratio']:.4f} [{r['paired_lo']:.4f}, {r['paired_hi']:.4f}] over "
                      f"v{parent['version']} side by side")
        if r["chain_ratio"] is not None and r["version"] and not (parent and parent["version"] == 0):
            proved += f"; x{r['chain_ratio']:.4f} [{r['chain_lo']:.4f}, {r['chain_hi']:.4f}] over v0 chained"
        score = f"{r['score']:.1f} TFLOPS in its own evaluation" if r["score"] is not None else "not timed (unranked)"
        out.append(f"## {run_id} v{r['version']}: {(r['message'] or '(no message)').splitlines()[0][:120]}\n")
        out.append(f"Speed:{proved or ' -'}. Score: {score}. Registers {r['registers']}, spills {r['spill_bytes']} "
                   f"bytes, shared memory {r['smem_bytes']} bytes, {r['threads']} threads.")
        configs = [c for c in r["configs"] or [] if c.get("tflops")]
        if configs:
            out.append("Per config: " + ", ".join(
                f"{c['key']} {c['tflops']:.1f}" + (f" (cuDNN {c['cudnn_tflops']:.1f})" if c.get("cudnn_tflops") else "")
                for c in configs) + ".")
        if r["message"] and "\n" in r["message"].strip():
            out.append("\n" + r["message"].strip())
        out.append("")
    return run_id, "\n".join(out)


def write_lessons(src_run: Path, dst_run: Path) -> Path | None:
    """<dst_run>/agent/lessons_from_<source run id>.md; an existing file is kept as it is."""
    made = lessons_markdown(src_run)
    if made is None:
        return None
    run_id, text = made
    dst = Path(dst_run) / "agent" / f"lessons_from_{run_id}.md"
    if dst.exists():
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    from avo.fsutil import atomic_write_text

    atomic_write_text(dst, text)
    return dst


def seed_meta(run_dir: Path | None, version: int | None) -> dict:
    """What a step-0 row records (in `extra`) about the run a seed was transferred from."""
    if run_dir is None:
        return {}
    info = lineage.read_run_info(run_dir) or {}
    return {"transfer": {"run_dir": str(Path(run_dir).resolve()), "run_id": info.get("run_id"), "version": version,
                         "kernel": info.get("kernel"), "group": info.get("group")}}


def compiler_note(run_dir: Path, here: str) -> str | None:
    """A line when the run a seed comes from built its candidates with another compiler than this harness:
    NVRTC versions differ in what they accept and in what ptxas reports, so a candidate checked here may
    fail there (a CPU checkout checking candidates for a GPU run is the usual case)."""
    rows = lineage.read_run(run_dir)
    theirs = rows["extra"].str.json_path_match("$.compiler").drop_nulls().unique().sort().to_list() if len(rows) else []
    if not here or not theirs or theirs == [here]:
        return None
    return (f"the seed's run {run_dir} compiled with {', '.join(theirs)} and this harness with {here}: what "
            "compiles here may not compile there, and registers, spills and ptxas's notes can differ")


def failed_seed(rows: pl.DataFrame) -> dict | None:
    """The step-0 row of a transferred seed that failed here, while the lineage has no version yet."""
    if rows.is_empty() or rows["committed"].any():
        return None
    seeds = rows.filter((pl.col("step") == 0) & (pl.col("decision") == "failed")).sort("attempt")
    for r in reversed(list(seeds.iter_rows(named=True))):
        if "transfer" in json.loads(r["extra"] or "{}"):
            return r
    return None
