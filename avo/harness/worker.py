"""The child side of the harness: python -m avo.harness.worker JOB_DIR.

Reads JOB_DIR/job.json and JOB_DIR/source.cu, writes JOB_DIR/result.json atomically.
Everything that touches candidate code (NVRTC, the CUDA context) happens here.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from avo.fsutil import atomic_write_json
from avo.harness.sandbox import RESULT
from avo.harness.nvrtc import compile_source
from avo.types import EvalResult, Problem, Shape, Status


def problem_from_dict(d: dict) -> Problem:
    return Problem(d["name"], d["heads_q"], d["heads_kv"], d["head_dim"],
                   tuple(Shape(**s) for s in d["bench"]), tuple(Shape(**s) for s in d["check"]))


def compile_only(source: str, job: dict) -> EvalResult:
    problem = problem_from_dict(job["problem"])
    t0 = time.perf_counter()
    c = compile_source(source, job["arch"], problem.head_dim, job.get("cache_dir"))
    dt = time.perf_counter() - t0
    common = dict(log=c.log[-8000:], registers=c.registers, spill_bytes=c.spill_bytes,
                  stack_bytes=c.stack_bytes, compile_s=dt)
    if not c.ok:
        return EvalResult(Status.COMPILE_ERROR, error=c.error or "compile error", **common)
    return EvalResult(Status.OK, ranked=False, smem_bytes=c.launch.smem, threads=c.launch.threads, **common)


MODES = {"compile": compile_only}


def main(job_dir: str) -> int:
    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    source = (job_dir / "source.cu").read_text()
    try:
        result = MODES[job["mode"]](source, job)
    except Exception as e:  # noqa: BLE001 - everything is reported to the parent as a result
        result = EvalResult(Status.CRASHED, error=f"{type(e).__name__}: {e}", log=traceback.format_exc()[-8000:])
    atomic_write_json(job_dir / RESULT, result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
