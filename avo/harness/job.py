"""The job contract between the harness and its worker process: JOB_DIR/job.json, typed.

The parent writes a Job (atomically) beside the candidate's source.cu; the worker reads it back,
does what `mode` says and writes result.json. Every field the worker reads is declared here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from avo.fsutil import atomic_write_json, atomic_write_text
from avo.types import Problem, Shape

JOB_FILE = "job.json"


def write_sources(job_dir: Path, sources: dict[str, str]) -> dict[str, str]:
    """Each named source as JOB_DIR/<name>.cu (atomically); returns name -> absolute path, for a Job."""
    paths = {}
    for name, source in sources.items():
        path = (Path(job_dir) / f"{name.replace(':', '_')}.cu").resolve()
        atomic_write_text(path, source)
        paths[name] = str(path)
    return paths


@dataclass
class Job:
    mode: str                       # compile | precompile | evaluate | check | bench | trials | profile
    problem: dict                   # avo.types.Problem as a dict (problem_of() reads it back)
    arch: str                       # NVRTC target, or "auto": the device's own
    harness: dict                   # the resolved harness config (tolerances, timing, limits)
    cache_dir: str | None = None    # cubin cache
    lock: str | None = None         # the device lock file (avo.harness.devlock)
    others: dict[str, str] = field(default_factory=dict)   # evaluate: role -> source path (incumbent, anchor)
    sources: dict[str, str] = field(default_factory=dict)  # bench, trials: name -> source path
    pairs: list[list[str]] = field(default_factory=list)   # trials: [condition, candidate, incumbent]
    trials: int = 0
    commit: dict = field(default_factory=dict)  # evaluate: the search's commit rule (avo.commit); {}: none known
    shape: str = ""                 # profile: the benchmark shape's key
    compiled_dir: str | None = None  # evaluate: the candidate compiled ahead (avo.harness.ahead), loaded from here
    job_dir: str = ""               # filled in by read(): where the job lives

    @property
    def device(self) -> int:
        """The CUDA device the job runs on: its harness config's `device`, which the evaluation reads
        too; the GPU harness sets it per job (avo.harness.devices)."""
        return int(self.harness.get("device", 0))

    def place(self, index: int, uuid: str = "") -> None:
        """Run on CUDA device `index`, whose driver UUID (hex, from the probe) names it to NVML."""
        self.harness = {**self.harness, "device": int(index), "device_uuid": uuid}

    def problem_of(self) -> Problem:
        d = self.problem
        return Problem(d["name"], d["heads_q"], d["heads_kv"], d["head_dim"],
                       tuple(Shape(**s) for s in d["bench"]), tuple(Shape(**s) for s in d["check"]))

    def write(self, job_dir: Path) -> Path:
        d = asdict(self)
        d.pop("job_dir")
        atomic_write_json(Path(job_dir) / JOB_FILE, d)
        return Path(job_dir)

    @classmethod
    def read(cls, job_dir: Path) -> "Job":
        d = json.loads((Path(job_dir) / JOB_FILE).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{job_dir}/{JOB_FILE}: unknown fields {sorted(unknown)} (a newer AVO wrote it?)")
        return cls(**d, job_dir=str(job_dir))

    @classmethod
    def for_problem(cls, mode: str, problem: Problem, arch: str, harness: dict, **kw) -> "Job":
        return cls(mode, asdict(problem), arch, harness, **kw)
