"""The lineage's rows: their columns, derived from the result dataclasses, and what each column means.

Every field of EvalResult, ConfigResult, Proposal and Redirect becomes a column (or a field of `configs`)
of the same name and type, except the few NOT_STORED names, which say where that value goes instead; so
a field added to one of them is written, read and documented without a change here, and one without a
line in DOCS fails tests/test_lineage.py. docs/lineage.md's column tables are `python -m avo.schema`.
"""
from __future__ import annotations

import json
import socket
import types
import typing
from dataclasses import fields
from datetime import datetime, timezone
from enum import Enum

import polars as pl
import pyarrow as pa

from avo.types import ADAPTED, COMMITS, MIGRATION, ConfigResult, Decision, EvalResult, Proposal, Redirect, Status

SCHEMA_VERSION = 6  # 3: worker, island; 4: device; 5: the supervisor rows' island; 6: migrations timed side by side
MAX_CHUNKS = 64  # an in-memory frame grown row by row is rechunked past this many chunks (extended)
ORIGINAL = ~pl.col("decision").is_in([d.value for d in MIGRATION])  # an operator's attempt or the seed
# what an attempt came to (one of avo.types.OUTCOMES): its decision if its evaluation passed, else its status
OUTCOME = (pl.when(pl.col("status") != Status.OK.value).then(pl.col("status"))
           .when(pl.col("decision") == Decision.SEED.value).then(pl.lit(ADAPTED)).otherwise(pl.col("decision")))
STAGE_COLUMNS = ("compile_s", "verify_s", "screen_s", "bench_s")  # an evaluation's own clocks, stage by stage
WIDE_COLUMNS = ("configs", "message", "error", "extra")  # lists and free text: read only where needed
TS = pa.timestamp("us", tz="UTC")
# fields of the dataclasses that are no column of their own, and where their value goes
NOT_STORED = {"EvalResult.log": "its last 2000 characters: extra.log_tail",
              "EvalResult.compiler": "extra.compiler", "Proposal.source": "lineage/sources/<source_sha>.cu",
              "Proposal.meta": "extra (JSON)"}


def _arrow(hint, ints: pa.DataType) -> pa.DataType:
    """The Arrow type of a field's annotation (X | None: X; enums are stored by value)."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return pa.list_(CONFIG_STRUCT if item is ConfigResult else _arrow(item, ints))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return pa.string()
    return {bool: pa.bool_(), int: ints, float: pa.float64(), str: pa.string()}[hint]


def _columns(cls, ints: pa.DataType | None = None) -> list[tuple[str, pa.DataType]]:
    hints, ints = typing.get_type_hints(cls), ints or pa.int32()
    return [(f.name, _arrow(hints[f.name], ints)) for f in fields(cls) if f"{cls.__name__}.{f.name}" not in NOT_STORED]


CONFIG_STRUCT = pa.struct(_columns(ConfigResult))
RESULT = [name for name, _ in _columns(EvalResult)]
PROPOSED = [name for name, _ in _columns(Proposal, pa.int64())]
SCHEMA = pa.schema([
    ("schema_version", pa.int32()), ("run_id", pa.string()), ("step", pa.int32()), ("attempt", pa.int32()),
    ("candidate_id", pa.string()), ("parent_id", pa.string()), ("version", pa.int32()), ("committed", pa.bool_()),
    ("decision", pa.string()), *_columns(EvalResult), ("best_before", pa.float64()), ("source_sha", pa.string()),
    ("operator", pa.string()), *_columns(Proposal, pa.int64()), ("propose_s", pa.float64()),
    ("kernel", pa.string()), ("heads_q", pa.int32()), ("heads_kv", pa.int32()), ("head_dim", pa.int32()),
    ("group", pa.int32()), ("directive", pa.string()), ("started_at", TS), ("finished_at", TS),
    ("host", pa.string()), ("extra", pa.string()), ("worker", pa.int32()), ("island", pa.int32()),
])
SUPERVISOR_SCHEMA = pa.schema([("run_id", pa.string()), ("step", pa.int32()), ("reason", pa.string()),
                               ("operator", pa.string()), ("at", TS), *_columns(Redirect, pa.int64()),
                               ("island", pa.int32())])

DOCS = {
    "schema_version": f"{SCHEMA_VERSION}; rows of older schemas read the columns added since as null (2 added the "
                      "paired columns, 3 `worker` and `island`, 4 `device`, 5 the supervisor rows' `island`, 6 "
                      "migrations timed side by side with the head they replace: decision `kept`)",
    "run_id": "from run.json; unique per run directory",
    "step": "step 0 is the seed; with `search.workers` > 1 each step is one worker's, so steps finish out of order",
    "attempt": "up to `search.attempts_per_step` per step; a migration's row: the receiving island",
    "candidate_id": "`{step:05d}.{attempt:02d}`",
    "parent_id": "the committed version it was judged against, timed side by side: its island's head at the "
                 "decision (the older head of a `stale` candidate is `extra.stale_from`; a migration's: the head "
                 "it would replace; migrants of schema 5 and older: the version copied)",
    "version": "k of x_k when committed (the seed is x_0; numbered across islands), else null",
    "committed": "the lineage advanced to it: decision `seed`, `committed` or `migrated`",
    "decision": "what the search made of it, `avo.types.Decision`: " + ", ".join(f"`{d.value}`" for d in Decision),
    "status": "how its evaluation went, `avo.types.Status`: `ok`, or why it did not pass",
    "ranked": "the score measures speed (false: harness=compile)",
    "score": "geometric-mean TFLOPS of its own evaluation (the screen's shapes when `stage` is `screen`); "
             "comparable only with what was timed in the same evaluation",
    "configs": "per benchmark config: " + ", ".join(f"`{f.name}`" for f in CONFIG_STRUCT) +
               " (samples: ms of each timed iteration; incumbent/anchor: timed in the same iterations; ratio: "
               "candidate / incumbent speed with one-sided bounds)",
    "error": "one paragraph saying why the evaluation failed",
    "registers": "from the compiled cubin", "spill_bytes": "from the compiled cubin",
    "stack_bytes": "from the compiled cubin", "smem_bytes": "shared memory of the launch geometry",
    "threads": "threads per block of the launch geometry",
    "compile_s": "seconds in each stage of the evaluation", "verify_s": "seconds in each stage of the evaluation",
    "bench_s": "seconds in each stage of the evaluation",
    "gpu": "the GPU it was timed on", "device": "the CUDA device index it was evaluated on (one of "
                                                "`harness.devices`); null without a GPU",
    "sm_clock_mhz": "SM clock during the timing (NVML)", "power_w": "power during the timing (NVML)",
    "stage": "the last timed stage: `screen` (stopped there) or `bench`", "screen_s": "the screen's seconds",
    "paired_ratio": "candidate / incumbent (its parent) geomean speed, timed side by side (avo.paired)",
    "paired_lo": "one-sided lower bound of `paired_ratio` at `search.commit.alpha`",
    "paired_hi": "one-sided upper bound of `paired_ratio` at `search.commit.alpha`",
    "incumbent_score": "the incumbent's geomean TFLOPS in the same evaluation",
    "anchor_ratio": "candidate / anchor, timed side by side (`search.commit.rule=noninferior`)",
    "anchor_lo": "its lower bound", "anchor_hi": "its upper bound",
    "best_before": "the parent's score from its own evaluation (informational: decisions use the paired ratio)",
    "source_sha": "`lineage/sources/<source_sha>.cu`",
    "operator": "the variation operator (`mutation`, `llm`, `external`; `migration` for a migration's rows)",
    "message": "the operator's description of the change (the commit message when committed)",
    "model": "the model behind the operator", "prompt_tokens": "LLM cost of the proposal",
    "completion_tokens": "LLM cost of the proposal", "llm_calls": "LLM cost of the proposal",
    "propose_s": "seconds the operator took to propose it",
    "kernel": "the problem: `kernel.name`", "heads_q": "the problem's query heads",
    "heads_kv": "the problem's KV heads", "head_dim": "the problem's head dim",
    "group": "heads_q / heads_kv", "directive": "the supervisor's directive in force",
    "started_at": "when the attempt began (UTC)", "finished_at": "when it was recorded (UTC)",
    "host": "the machine the search ran on",
    "extra": "JSON: `log_tail`, `compiler` (what built the cubin, e.g. `nvrtc 13.0`) and the operator's metadata; "
             "for a candidate whose parent was no longer the head at its decision `stale_from`, `stale_ratio`, "
             "`stale_lo`, `stale_eval_s`, `rechecked`; for a migration `migrated_from` (the version copied) and "
             "`from_island`",
    "worker": "which of the `search.workers` operators proposed it (0 with one)",
    "island": "which lineage of the run it belongs to (`search.islands`; 0 with one; v0 belongs to all)",
    # supervisor rows
    "reason": "why the island looked stuck (avo.stagnation)", "at": "when the intervention was recorded (UTC)",
    "latency_s": "seconds the supervisor's LLM took (0 without one)",
}
SUPERVISOR_DOCS = {"step": "the step after which it reviewed the island", "operator": "the operator it redirected",
                   "directive": "the directions given to the island's operators",
                   "model": "the supervisor's model (empty without an LLM)", "island": "the island reviewed",
                   **dict.fromkeys(("prompt_tokens", "completion_tokens", "llm_calls"), "LLM cost of the review")}


def _value(v):
    return v.value if isinstance(v, Enum) else [vars(c) for c in v] if isinstance(v, list) and v and \
        isinstance(v[0], ConfigResult) else v


def _compiler(result) -> dict:
    return {"compiler": result.compiler} if result.compiler else {}


def attempt_row(*, run_id: str, step: int, attempt: int, parent, version: int | None, decision: str, result,
                proposal, operator, problem, directive: str | None, started, propose_s: float, source_sha: str,
                worker: int = 0, island: int = 0) -> dict:
    """The one place an attempt becomes a row of SCHEMA: from the search's objects (parent: the Version
    it was judged against, result: EvalResult, proposal: Proposal, operator: name and model, problem: Problem)."""
    decision = Decision(decision)
    return {
        "run_id": run_id, "step": step, "attempt": attempt, "candidate_id": f"{step:05d}.{attempt:02d}",
        "parent_id": parent.candidate_id if parent else None, "version": version, "committed": decision in COMMITS,
        "decision": decision.value, **{k: _value(getattr(result, k)) for k in RESULT},
        "best_before": parent.score if parent else None, "source_sha": source_sha, "operator": operator.name,
        **{k: getattr(proposal, k) for k in PROPOSED}, "model": proposal.model or operator.model,
        "propose_s": propose_s, "kernel": problem.name, "heads_q": problem.heads_q, "heads_kv": problem.heads_kv,
        "head_dim": problem.head_dim, "group": problem.group, "directive": directive, "started_at": started,
        "finished_at": datetime.now(timezone.utc), "host": socket.gethostname(),
        "extra": json.dumps({"log_tail": result.log[-2000:], **_compiler(result), **proposal.meta}, default=str),
        "worker": worker, "island": island,
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


def _type(t: pa.DataType) -> str:
    short = {pa.int32(): "i32", pa.int64(): "i64", pa.float64(): "f64", pa.string(): "str", pa.bool_(): "bool",
             TS: "timestamp[us, UTC]"}
    if pa.types.is_list(t):
        return "list<struct>" if pa.types.is_struct(t.value_type) else f"list<{_type(t.value_type)}>"
    return short[t]


def markdown(schema: pa.Schema = SCHEMA, docs: dict | None = None) -> str:
    """The documented column table (docs/lineage.md holds exactly this)."""
    docs = {**DOCS, **(docs or {})}
    return "\n".join(["| column | type | meaning |", "|---|---|---|"]
                     + [f"| {f.name} | {_type(f.type)} | {docs[f.name]} |" for f in schema])


if __name__ == "__main__":
    print(f"## Attempt rows (schema_version {SCHEMA_VERSION})\n\n{markdown()}\n\n## Supervisor rows\n\n"
          f"{markdown(SUPERVISOR_SCHEMA, SUPERVISOR_DOCS)}")
